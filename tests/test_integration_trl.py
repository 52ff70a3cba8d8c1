"""FastPrefDPOTrainer against stock trl.DPOTrainer on a tiny Llama built from a config (CPU, no downloads).

Parity runs train both trainers for two steps from identical seeds, models and data with plain SGD (Adam's first
step is a sign and would amplify fp32 rounding of near-zero gradients) and compare the logged losses, the
gradients of both steps and the updated parameters.
"""

from __future__ import annotations

import copy
import math
import os
import uuid

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import torch.nn.functional as F  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fastpref.integrations._hf_utils import find_causal_lm  # noqa: E402
from fastpref.integrations.transformers import _STATE, is_patched  # noqa: E402
from fastpref.integrations.trl import FastPrefDPOTrainer  # noqa: E402
from fastpref.losses import functional as FL  # noqa: E402
from fastpref.losses import param_null_penalty  # noqa: E402

WORDS = [f"w{i}" for i in range(100)]
# transformers 5.2x renamed `gradient_checkpointing` (deprecated, warns) to `activation_checkpointing`
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in DPOConfig.__dataclass_fields__
                 else "gradient_checkpointing")
LOSS_TOL = 2e-5  # relative, fp32 rounding (chunked log-softmax sums in another order)
GRAD_TOL = 1e-4  # ||g - g_ref|| / ||g_ref|| per parameter tensor
PARAM_TOL = 1e-6  # absolute, updated parameters after two SGD steps


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: threads only add contention (the suite runs in well under a minute on one core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def words(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    rows = []
    for _ in range(n):
        row = {"prompt": words(2, 6), "chosen": " " + words(1, 6), "rejected": " " + words(1, 6)}
        while row["rejected"] == row["chosen"]:
            row["rejected"] = " " + words(1, 6)
        rows.append(row)
    return rows


def _dataset(n=8, seed=0, **columns):
    """A fresh dataset (a unique `tag` column gives it its own fingerprint, so no cache is shared)."""
    rows = _rows(n, seed)
    tag = uuid.uuid4().hex
    for i, row in enumerate(rows):
        row["tag"] = tag
        for name, values in columns.items():
            row[name] = values[i]
    return datasets.Dataset.from_list(rows)


def _model(seed=0):
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _config(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                max_steps=2, report_to=[], save_strategy="no", logging_steps=1, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0, bf16=False)
    base[CHECKPOINTING] = False
    base.update(kwargs)
    return DPOConfig(**base)


class GradRecorder(TrainerCallback):
    """Records the model's trainable gradients just before each optimizer step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None})


def _train(cls, tokenizer, tmp_path, *, peft=False, ref=True, seed=0, dataset=None, trainer_kwargs=None, **config):
    model = _model(seed)
    ref_model = copy.deepcopy(model) if ref and not peft else None
    kwargs = dict(trainer_kwargs or {})
    if peft:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    recorder = GradRecorder()
    trainer = cls(model=model, ref_model=ref_model, args=_config(tmp_path, **config),
                  train_dataset=dataset if dataset is not None else _dataset(), processing_class=tokenizer,
                  callbacks=[recorder], **kwargs)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, losses, recorder.steps, params


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12))


def _assert_same_training(fast, stock):
    _, f_losses, f_grads, f_params = fast
    _, s_losses, s_grads, s_params = stock
    assert len(f_losses) == len(s_losses) == 2
    for f, s in zip(f_losses, s_losses):
        assert math.isfinite(f) and abs(f - s) <= LOSS_TOL * max(1.0, abs(s)), (f_losses, s_losses)
    assert len(f_grads) == len(s_grads) == 2
    for step, (fg, sg) in enumerate(zip(f_grads, s_grads)):
        assert fg.keys() == sg.keys()
        for name in sg:
            if sg[name].norm() < 1e-10:
                assert fg[name].norm() < 1e-7, (step, name)
            else:
                assert _rel(fg[name], sg[name]) < GRAD_TOL, (step, name, _rel(fg[name], sg[name]))
    assert f_params.keys() == s_params.keys()
    for name in s_params:
        torch.testing.assert_close(f_params[name], s_params[name], atol=PARAM_TOL, rtol=0, msg=name)


UNCOMPARED_LOG_KEYS = ("epoch", "step", "learning_rate", "grad_norm")


def assert_same_logs(fast_logs, stock_logs, *, rel_tol, abs_tol):
    """Every metric stock logs at each step, logged by fastpref with the same value."""
    assert len(fast_logs) == len(stock_logs) > 0
    for f, s in zip(fast_logs, stock_logs):
        missing = set(s) - set(f)
        assert not missing, f"stock logs {sorted(missing)}, fastpref does not"
        for key, value in s.items():
            if key not in UNCOMPARED_LOG_KEYS:
                assert math.isclose(f[key], value, rel_tol=rel_tol, abs_tol=abs_tol), (key, f[key], value)


def assert_same_logged_training(fast, stock):
    """Two SGD steps of ``(trainer, logs, grads, params)`` runs: the same logged metrics, gradients, parameters."""
    _, f_logs, f_grads, f_params = fast
    _, s_logs, s_grads, s_params = stock
    assert len(f_logs) == len(s_logs) == 2 and len(f_grads) == len(s_grads) == 2
    assert_same_logs(f_logs, s_logs, rel_tol=2e-5, abs_tol=2e-6)
    for fg, sg in zip(f_grads, s_grads):
        assert fg.keys() == sg.keys()
        for name in sg:
            if sg[name].norm() > 1e-10:
                assert _rel(fg[name], sg[name]) < 1e-4, (name, _rel(fg[name], sg[name]))
    for name in s_params:
        torch.testing.assert_close(f_params[name], s_params[name], atol=1e-6, rtol=0, msg=name)


def _both(tokenizer, tmp_path, **kwargs):
    stock = _train(DPOTrainer, tokenizer, tmp_path / "stock", **kwargs)
    fast = _train(FastPrefDPOTrainer, tokenizer, tmp_path / "fast", **kwargs)
    return fast, stock


# --------------------------------------------------------------------------------------------- parity

LOSS_CONFIGS = {
    "sigmoid": {},
    "hinge": {},
    "ipo": {},
    "exo_pair": {"label_smoothing": 1e-3},
    "nca_pair": {},
    "robust": {"label_smoothing": 0.1},
    "bco_pair": {},
    "sppo_hard": {},
    "aot": {"label_smoothing": 0.1},
    "aot_unpaired": {"label_smoothing": 0.1},
    "apo_zero": {},
    "apo_down": {},
    "discopop": {},
    "sft": {},
    "sigmoid_norm": {},
}


def test_every_trl_loss_type_is_covered():
    assert set(LOSS_CONFIGS) == set(FL.DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", sorted(LOSS_CONFIGS))
def test_loss_type_matches_stock(loss_type, tokenizer, tmp_path):
    fast, stock = _both(tokenizer, tmp_path, loss_type=[loss_type], beta=0.5, **LOSS_CONFIGS[loss_type])
    _assert_same_training(fast, stock)
    assert fast[1][1] != fast[1][0]  # the second step sees a moved policy


@pytest.mark.parametrize("extra", [
    {"loss_type": ["sigmoid", "sft", "ipo"], "loss_weights": [0.8, 0.2, 0.5]},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.5},
    {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["hinge"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": ["sigmoid"], CHECKPOINTING: True},
    {"loss_type": ["ipo"], "ld_alpha": 0.3, "precompute_ref_log_probs": True, "ref": False},
], ids=["multi-loss", "ld_alpha", "js_divergence", "alpha_divergence", "gradient_checkpointing",
        "ld_alpha-precompute"])
def test_config_options_match_stock(extra, tokenizer, tmp_path):
    fast, stock = _both(tokenizer, tmp_path, beta=0.5, **extra)
    _assert_same_training(fast, stock)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_peft_lora_matches_stock(loss_type, tokenizer, tmp_path):
    pytest.importorskip("peft")
    fast, stock = _both(tokenizer, tmp_path, peft=True, loss_type=[loss_type], beta=0.5)
    _assert_same_training(fast, stock)
    head = fast[0].model.get_base_model().lm_head.weight
    assert not head.requires_grad and head.grad is None  # frozen head: fastpref's no-dW path


@pytest.mark.parametrize("method_loss", ["sigmoid", "ipo"])
def test_triton_backend_matches_stock(method_loss, tokenizer, tmp_path):
    """The Triton kernels (fused head and fused loss head; on the CPU through TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and no Triton interpreter")
    stock = _train(DPOTrainer, tokenizer, tmp_path / "s", loss_type=[method_loss], beta=0.5)
    fast = _train(FastPrefDPOTrainer, tokenizer, tmp_path / "f", loss_type=[method_loss], beta=0.5,
                  trainer_kwargs={"fastpref_backend": "triton"})
    _assert_same_training(fast, stock)
    assert find_causal_lm(fast[0].model).__dict__[_STATE].backend == "triton"


def test_bf16_mixed_precision_close_to_stock(tokenizer, tmp_path):
    """TRL's default `bf16=True` (autocast, also on the CPU): same losses to bf16 rounding."""
    fast, stock = _both(tokenizer, tmp_path, bf16=True, beta=0.5)
    for f, s in zip(fast[1], stock[1]):
        assert abs(f - s) < 2e-2 * max(1.0, abs(s)), (fast[1], stock[1])
    for name, p in stock[3].items():
        assert _rel(fast[3][name], p) < 1e-2, name


class _CountingTrainer(FastPrefDPOTrainer):
    ref_calls = 0

    def compute_ref_log_probs(self, model, inputs):
        type(self).ref_calls += 1
        return super().compute_ref_log_probs(model, inputs)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_precompute_ref_log_probs_matches_stock(peft, tokenizer, tmp_path):
    if peft:
        pytest.importorskip("peft")
    _CountingTrainer.ref_calls = 0
    stock = _train(DPOTrainer, tokenizer, tmp_path / "s", peft=peft, ref=False, precompute_ref_log_probs=True,
                   beta=0.5)
    fast = _train(_CountingTrainer, tokenizer, tmp_path / "f", peft=peft, ref=False, precompute_ref_log_probs=True,
                  beta=0.5)
    assert _CountingTrainer.ref_calls == 4  # 8 examples / batch 2, computed by fastpref (fresh dataset, no cache)
    assert fast[0].ref_model is None
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(fast[0].train_dataset[column]),
                                   torch.tensor(stock[0].train_dataset[column]), rtol=1e-5, atol=1e-5)
    _assert_same_training(fast, stock)


def test_evaluate_matches_stock(tokenizer, tmp_path):
    results = []
    for cls in (DPOTrainer, FastPrefDPOTrainer):
        model = _model()
        trainer = cls(model=model, ref_model=copy.deepcopy(model), args=_config(tmp_path / cls.__name__),
                      train_dataset=_dataset(), eval_dataset=_dataset(6, seed=1), processing_class=tokenizer)
        trainer.train()
        results.append(trainer.evaluate())
    fast, stock = results[1], results[0]
    assert abs(fast["eval_loss"] - stock["eval_loss"]) < 1e-5
    for key in ("eval_rewards/chosen", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"):
        assert abs(fast[key] - stock[key]) < 1e-4 * max(1.0, abs(stock[key])), key


def test_moe_router_aux_loss_matches_stock(tokenizer, tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    def build():
        config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, attn_implementation="eager", pad_token_id=0, eos_token_id=1,
                               bos_token_id=1, router_aux_loss_coef=0.02)
        torch.manual_seed(0)
        return MixtralForCausalLM(config)

    runs = []
    for cls in (DPOTrainer, FastPrefDPOTrainer):
        model = build()
        recorder = GradRecorder()
        trainer = cls(model=model, ref_model=copy.deepcopy(model), args=_config(tmp_path / cls.__name__),
                      train_dataset=_dataset(), processing_class=tokenizer, callbacks=[recorder])
        trainer.train()
        assert trainer.aux_loss_enabled
        logs = [e for e in trainer.state.log_history if "loss" in e]
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        runs.append((trainer, [e["loss"] for e in logs], recorder.steps, params))
        assert all("aux_loss" in e for e in logs)
    _assert_same_training(runs[1], runs[0])


# --------------------------------------------------------------------------------------------- the fused path


def _spy(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("setup", ["ref_model", "lora", "precompute"])
def test_lm_head_is_never_called(setup, tokenizer, tmp_path):
    if setup == "lora":
        pytest.importorskip("peft")
    model = _model()
    kwargs = {}
    ref_model = None
    if setup == "ref_model":
        ref_model = copy.deepcopy(model)
    elif setup == "lora":
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    config = _config(tmp_path, precompute_ref_log_probs=setup == "precompute")
    trainer = FastPrefDPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=_dataset(),
                                 processing_class=tokenizer, **kwargs)
    # spies from here on: patch() checked the head transform once at construction, through the head
    heads = [trainer.model.get_output_embeddings()]
    if trainer.ref_model is not None:
        heads.append(trainer.ref_model.get_output_embeddings())
    spies = [_spy(h) for h in heads]
    try:
        trainer.train()
    finally:
        for _, handle in spies:
            handle.remove()
    assert is_patched(trainer.model)
    assert all(not calls for calls, _ in spies)
    assert "logps/chosen" in trainer.state.log_history[0]


def test_precompute_pass_does_not_call_the_head(tokenizer, tmp_path, monkeypatch):
    seen = []
    original = torch.nn.Linear.forward

    def counting(self, x):
        if self.out_features == 128 and not getattr(counting, "verifying", False):
            seen.append(x.shape)
        return original(self, x)

    import fastpref.integrations.transformers as fpt

    verify = fpt.verify_head

    def quiet_verify(*a, **k):  # patch()'s one-off 3-row check of the head transform is allowed
        counting.verifying = True
        try:
            return verify(*a, **k)
        finally:
            counting.verifying = False

    monkeypatch.setattr(fpt, "verify_head", quiet_verify)
    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    trainer = FastPrefDPOTrainer(model=_model(), args=_config(tmp_path, precompute_ref_log_probs=True),
                                 train_dataset=_dataset(), processing_class=tokenizer)
    assert not seen
    assert len(trainer.train_dataset["ref_chosen_logps"]) == 8


# --------------------------------------------------------------------------------------------- fastpref methods


def _plain_logps(model, batch):
    """Per-sequence response log-probs, last hidden rows, counts: materialized logits (the normal forward)."""
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = completion[:, 1:].bool() & attention[:, 1:].bool()
    logps = (token * mask).sum(1)
    last = torch.stack([torch.nonzero(m)[-1, 0] for m in mask]) + 1  # row t predicts token t + 1: read row t + 1
    return logps, hidden[torch.arange(ids.shape[0]), last], mask.sum(1).float(), logits, hidden


def _batch(trainer, n=2):
    trainer.model.train()
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _method_trainer(method, tokenizer, tmp_path, method_kwargs=None, dataset=None, **config):
    model = _model()
    return FastPrefDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=_config(tmp_path, beta=0.5, **config),
                              train_dataset=dataset if dataset is not None else _dataset(),
                              processing_class=tokenizer, method=method, method_kwargs=method_kwargs)


def test_typo_is_refused_without_reference_samples(tokenizer, tmp_path):
    """Issue 10: TYPO through FastPrefDPOTrainer silently ran with lam = 0 (DPO data carries no reference samples).
    It is refused, pointing to TYPOTrainer and the sampling helper; lam = 0 must be asked for explicitly."""
    with pytest.raises(NotImplementedError, match="TYPOTrainer.*sample_reference_responses"):
        _method_trainer("typo", tokenizer, tmp_path)
    with pytest.raises(NotImplementedError, match="TYPOTrainer"):
        _method_trainer("typo", tokenizer, tmp_path, {"lam": 0.05})
    trainer = _method_trainer("typo", tokenizer, tmp_path, {"lam": 0.0})
    assert trainer.fastpref_method_kwargs["lam"] == 0.0


@pytest.mark.parametrize("method,kwargs", [
    ("pro", {}), ("pro", {"eta": 0.2, "hyper_response": "zero"}), ("simpo", {"gamma": 0.3}), ("typo", {"lam": 0.0}),
    ("pro", {"eta": 0.0, "alpha": 1.0, "require_optimum": False}),
], ids=["pro", "pro-zero", "simpo", "typo", "pro-dpo-identity"])
def test_pairwise_method_equals_functional(method, kwargs, tokenizer, tmp_path):
    trainer = _method_trainer(method, tokenizer, tmp_path, kwargs, label_smoothing=0.1 if method == "simpo" else 0.0)
    batch = _batch(trainer, 4)
    loss = trainer.compute_loss(trainer.model, batch)
    logps, _, n, _, _ = _plain_logps(trainer.model, batch)
    ref, _, _, _, _ = _plain_logps(trainer.ref_model, batch)
    cw, cl = logps.chunk(2)
    if method == "pro":
        expected, _ = FL.pro_loss(logps, ref, feedback="pairwise", beta=0.5, **kwargs)
    elif method == "simpo":
        expected, _ = FL.simpo_loss(cw, cl, *n.chunk(2), beta=0.5, label_smoothing=0.1, **kwargs)
    else:
        expected, _ = FL.typo_loss(cw, cl, unsup_logps=None)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # and it trains: two steps, finite losses, TRL's metric names logged
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) for e in logs)
    assert {"rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(logs[0])


def test_drdo_equals_functional_and_trains_reward_head(tokenizer, tmp_path):
    g = torch.Generator().manual_seed(3)
    oracle = torch.randn(2, 8, generator=g)
    dataset = _dataset(oracle_chosen=oracle[0].tolist(), oracle_rejected=oracle[1].tolist())
    trainer = _method_trainer("drdo", tokenizer, tmp_path, {"alpha": 0.3, "gamma": 1.5}, dataset=dataset)
    head = trainer.reward_head
    assert isinstance(head, torch.nn.Linear) and head.in_features == 32
    with torch.no_grad():
        head.weight.normal_()
    batch = _batch(trainer, 4)
    loss = trainer.compute_loss(trainer.model, batch)
    logps, last_hidden, _, _, _ = _plain_logps(trainer.model, batch)
    rhat = head(last_hidden).reshape(-1).detach()
    expected, _ = FL.drdo_loss(*logps.chunk(2), *rhat.chunk(2), batch["oracle_chosen"], batch["oracle_rejected"],
                               alpha=0.3, gamma=1.5)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    before = head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, head.weight.detach())  # the trainer-owned head is optimized
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and "drdo/distill" in logs[0]
    trainer.save_model(str(tmp_path / "saved"))
    state = torch.load(tmp_path / "saved" / "fastpref_modules.pt")
    torch.testing.assert_close(state["reward_head.weight"], head.weight.detach())
    # evaluation needs the oracle columns too
    metrics = trainer.evaluate(_dataset(4, seed=2, oracle_chosen=[1.0] * 4, oracle_rejected=[0.0] * 4))
    assert math.isfinite(metrics["eval_loss"]) and "eval_drdo/distill" in metrics


def test_auxdpo_equals_functional_and_trains_delta(tokenizer, tmp_path):
    trainer = _method_trainer("auxdpo", tokenizer, tmp_path, {"lambda_null": 0.7, "lambda_amp": 0.05, "cap": 2.0})
    raw = trainer.delta_raw
    assert raw.shape == (16,)  # two offsets per example; the index column was added as the row number
    assert 0 < float(raw.detach().abs().max()) < 1e-2  # N(0, 1e-3) init, not zeros
    assert trainer.train_dataset["example_index"] == list(range(8))
    with torch.no_grad():
        raw.copy_(torch.randn(16, generator=torch.Generator().manual_seed(4)))
    delta = trainer.delta
    torch.testing.assert_close(delta, 2.0 * torch.tanh(raw))  # delta = cap tanh(delta_raw)
    batch = _batch(trainer, 4)
    loss = trainer.compute_loss(trainer.model, batch)

    logps, _, _, _, _ = _plain_logps(trainer.model, batch)
    ref, _, _, ref_logits, ref_hidden = _plain_logps(trainer.ref_model, batch)
    index = batch["example_index"]
    dw, dl = delta.detach()[2 * index], delta.detach()[2 * index + 1]
    # A_B delta_B restricted to the head: G = sum_t delta_seq(t) (onehot(y_t) - p_t) h_t^T over response tokens
    ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()
    probs = torch.softmax(ref_logits[:, :-1], -1)
    resid = F.one_hot(ids[:, 1:], 128).float() - probs
    weight = torch.cat([dw, dl])[:, None, None] * mask[..., None]
    G = torch.einsum("btv,btd->vd", resid * weight, ref_hidden[:, :-1].float())
    expected, _ = FL.auxdpo_loss(*logps.chunk(2), *ref.chunk(2), dw, dl, beta=0.5, null_penalty=G.pow(2).sum(),
                                 lambda_null=0.7, lambda_amp=0.05)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    before = raw.detach().clone()
    trainer.train()
    assert not torch.equal(before, raw.detach())
    group = [g for g in trainer.optimizer.param_groups if any(p is raw for p in g["params"])]
    assert len(group) == 1 and group[0]["initial_lr"] == 5e-3 and group[0]["weight_decay"] == 0.0  # its own group
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and "auxdpo/null_penalty" in logs[0]
    metrics = trainer.evaluate(_dataset(4, seed=2))  # no index column: evaluation uses delta = 0
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_auxdpo/delta_sq"] == 0.0


def test_auxdpo_without_penalty_and_precompute(tokenizer, tmp_path):
    trainer = FastPrefDPOTrainer(model=_model(), args=_config(tmp_path, precompute_ref_log_probs=True),
                                 train_dataset=_dataset(), processing_class=tokenizer, method="auxdpo",
                                 method_kwargs={"null_penalty": None, "init_std": 0.0})
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and "auxdpo/null_penalty" not in logs[0]
    assert logs[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # delta = 0 and policy = reference at step 1


def test_auxdpo_all_parameter_null_space_penalty(tokenizer, tmp_path):
    """null_penalty='params': the authors' form over every reference parameter the policy trains."""
    trainer = _method_trainer("auxdpo", tokenizer, tmp_path, {"null_penalty": "params", "init_std": 0.5})
    batch = _batch(trainer, 4)
    loss = trainer.compute_loss(trainer.model, batch)
    ref = _model().double()  # the reference's weights (the trainer's is a frozen copy of _model()), unpatched
    params = list(ref.parameters())
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mask = batch["completion_mask"][:, 1:].bool() & attn[:, 1:].bool()

    def ref_logps():
        logits = ref(input_ids=ids, attention_mask=attn).logits
        return (torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0] * mask).sum(-1)

    index = batch["example_index"]
    delta = trainer.delta.detach().double()
    want = param_null_penalty(ref_logps, params, torch.cat([delta[2 * index], delta[2 * index + 1]]))
    assert trainer._metrics["train"]["auxdpo/null_penalty"][-1] == pytest.approx(float(want), rel=1e-4)
    loss.backward()
    assert trainer.delta_raw.grad is not None and trainer.delta_raw.grad.abs().sum() > 0


def test_pro_with_lora(tokenizer, tmp_path):
    pytest.importorskip("peft")
    fast = _train(FastPrefDPOTrainer, tokenizer, tmp_path, peft=True, trainer_kwargs={"method": "pro"})
    assert all(math.isfinite(x) for x in fast[1]) and len(fast[1]) == 2


# --------------------------------------------------------------------------------------------- bad configuration


@pytest.mark.parametrize("config,trainer_kwargs,error,match", [
    ({}, {"method": "kto"}, ValueError, "`method` must be one of"),
    ({}, {"fastpref_backend": "cuda"}, ValueError, "fastpref_backend"),
    ({}, {"method": "pro", "method_kwargs": {"tau": 1.0}}, ValueError, "unknown `method_kwargs`"),
    ({}, {"method": "pro", "method_kwargs": {"beta": 1.0}}, ValueError, "DPOConfig.beta"),
    ({}, {"method": "pro", "method_kwargs": {"eta": 0.5, "alpha": 1.0}}, ValueError, "no optimum"),
    ({}, {"method": "simpo", "method_kwargs": {"gamma": -1.0}}, ValueError, "gamma"),
    ({}, {"method": "dpo", "method_kwargs": {"gamma": 1.0}}, ValueError, "unknown `method_kwargs`"),
    ({"loss_type": ["ipo"]}, {"method": "simpo"}, ValueError, "only used with method='dpo'"),
    ({"ld_alpha": 0.5}, {"method": "pro"}, ValueError, "only used with method='dpo'"),
    ({"label_smoothing": 0.1}, {"method": "pro"}, ValueError, "label_smoothing"),
    ({"loss_type": ["bogus"]}, {}, ValueError, "loss_type"),
    ({"loss_type": ["robust"], "label_smoothing": 0.6}, {}, ValueError, "robust"),
    ({"loss_type": ["exo_pair"]}, {}, ValueError, "exo_pair"),
    ({"use_weighting": True, "loss_type": ["aot"], "label_smoothing": 0.1}, {}, NotImplementedError, "aot"),
    ({}, {"method": "drdo"}, ValueError, "oracle_chosen"),
    ({"precompute_ref_log_probs": True}, {"method": "auxdpo"}, ValueError, "null_penalty"),
    ({}, {"method": "auxdpo", "method_kwargs": {"null_penalty": "all"}}, ValueError, "null_penalty"),
    ({}, {"method": "auxdpo", "method_kwargs": {"cap": 0.0}}, ValueError, "cap"),
    ({}, {"method": "auxdpo", "method_kwargs": {"delta_learning_rate": -1.0}}, ValueError, "delta_learning_rate"),
    ({}, {"method": "pro", "method_kwargs": {"eta": 0.0, "alpha": 1.0}}, ValueError, "no optimum"),
    ({}, {"method": "drdo", "method_kwargs": {"reward_head": 3}}, TypeError, "reward_head"),
])
def test_bad_configuration_raises_at_construction(config, trainer_kwargs, error, match, tokenizer, tmp_path):
    model = _model()
    with pytest.raises(error, match=match):
        FastPrefDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=_config(tmp_path, **config),
                           train_dataset=_dataset(), processing_class=tokenizer, **trainer_kwargs)


def test_custom_optimizer_without_extra_parameters_raises(tokenizer, tmp_path):
    model = _model()
    dataset = _dataset(oracle_chosen=[1.0] * 8, oracle_rejected=[0.0] * 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fastpref_modules"):
        FastPrefDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=_config(tmp_path), train_dataset=dataset,
                           processing_class=tokenizer, method="drdo", optimizers=(optimizer, None))


def test_lora_on_the_head_is_refused(tokenizer, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig

    with pytest.raises((ValueError, TypeError), match="lm_head|head"):
        FastPrefDPOTrainer(model=_model(), args=_config(tmp_path), train_dataset=_dataset(), processing_class=tokenizer,
                           peft_config=LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0))


# --------------------------------------------------------------------------------------------- ref_model=None


@pytest.mark.parametrize("method", ["simpo", "typo", "drdo"])
def test_reference_free_methods_build_no_reference(method, tokenizer, tmp_path, monkeypatch):
    """A model built from a config has no name to reload: reference-free methods need none and load none."""
    import trl.trainer.dpo_trainer as dpo_module

    loads = []
    original = dpo_module.create_model_from_path
    monkeypatch.setattr(dpo_module, "create_model_from_path", lambda *a, **k: loads.append(a) or original(*a, **k))
    copies = []
    original_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a: copies.append(type(x)) or original_deepcopy(x, *a))
    columns = {"oracle_chosen": [1.0] * 8, "oracle_rejected": [0.0] * 8} if method == "drdo" else {}
    model = _model()
    extra = {"method_kwargs": {"lam": 0.0}} if method == "typo" else {}  # TRL pairs: TYPO's supervised term alone
    trainer = FastPrefDPOTrainer(model=model, ref_model=None, args=_config(tmp_path), train_dataset=_dataset(**columns),
                                 processing_class=tokenizer, method=method, **extra)
    assert trainer.ref_model is None and not loads and LlamaForCausalLM not in copies
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) for e in logs)


def test_reference_free_method_refuses_precompute(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="reference-free.*precompute_ref_log_probs"):
        FastPrefDPOTrainer(model=_model(), args=_config(tmp_path, precompute_ref_log_probs=True),
                           train_dataset=_dataset(), processing_class=tokenizer, method="simpo")


@pytest.mark.parametrize("method", ["dpo", "pro"])
def test_ref_model_none_is_a_frozen_copy_of_the_policy(method, tokenizer, tmp_path):
    """Same training as an explicit `ref_model=copy.deepcopy(model)`; the copy is frozen and separate."""
    implicit = _train(FastPrefDPOTrainer, tokenizer, tmp_path / "implicit", ref=False, beta=0.5,
                      trainer_kwargs={"method": method})
    explicit = _train(FastPrefDPOTrainer, tokenizer, tmp_path / "explicit", ref=True, beta=0.5,
                      trainer_kwargs={"method": method})
    _assert_same_training(implicit, explicit)
    trainer = implicit[0]
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert reference is not trainer.model and not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    initial = _model()  # the policy's initial weights (same seed)
    for (name, p), q in zip(reference.named_parameters(), initial.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------------------------- overflow (pure fp16)


class _Snapshots(TrainerCallback):
    """The model's parameters after every optimizer step."""

    def __init__(self):
        self.params = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})


def overflow_hidden_during_step(trainer, step):
    """Every grad-enabled forward of the policy's backbone gets one inf in its last hidden state (row 0, last
    position) during optimizer step ``step`` (0-based), whatever number of forwards the trainer runs per step."""
    backbone = find_causal_lm(trainer.model).model

    def hook(module, args, output):
        if not torch.is_grad_enabled() or trainer.state.global_step != step:
            return None
        hidden = output.last_hidden_state.clone()
        hidden[0, -1, 0] = float("inf")
        output.last_hidden_state = hidden
        return output

    return backbone.register_forward_hook(hook)


def assert_overflowing_second_step_is_skipped(trainer, snapshots, caplog):
    """Trains ``trainer`` (3 steps, ``snapshots`` among its callbacks) with the second step's forward overflowing:
    that step moves nothing, the third trains, and the logs count the skipped step."""
    assert trainer.accelerator.scaler is None and trainer.args.max_steps == 3
    handle = overflow_hidden_during_step(trainer, step=1)
    try:
        with caplog.at_level("WARNING", logger="fastpref"):
            trainer.train()
    finally:
        handle.remove()
    first, second, third = snapshots.params
    for name in first:
        assert torch.equal(first[name], second[name]), name  # step 2 skipped: nothing moved
        assert torch.isfinite(third[name]).all(), name
    assert any(not torch.equal(second[n], third[n]) for n in first)  # step 3 trained
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e.get("skipped_steps", 0) for e in logs] == [0, 1, 1]
    assert "skipped" in caplog.text and "non-finite" in caplog.text
    assert trainer.lr_scheduler.last_epoch == 2  # the skipped step did not advance the schedule (as GradScaler's)


def _fp16_trainer(tokenizer, tmp_path, *, callbacks=(), **config):
    model = _model().half()  # pure fp16: half weights, no autocast, no GradScaler
    return FastPrefDPOTrainer(model=model, args=_config(tmp_path, max_steps=3, **config), train_dataset=_dataset(),
                              processing_class=tokenizer, callbacks=list(callbacks))


def test_pure_fp16_overflowing_forward_skips_the_step(tokenizer, tmp_path, caplog):
    """Where stock DPOTrainer applies the NaN update, the step is skipped and logged, and training goes on."""
    snapshots = _Snapshots()
    trainer = _fp16_trainer(tokenizer, tmp_path, callbacks=[snapshots])
    assert trainer.model.dtype == torch.float16
    assert_overflowing_second_step_is_skipped(trainer, snapshots, caplog)


def test_nonfinite_gradients_skip_the_step_and_keep_the_optimizer_state(tokenizer, tmp_path):
    snapshots = _Snapshots()
    model = _model()
    trainer = FastPrefDPOTrainer(model=model, args=_config(tmp_path, max_steps=3, optim="adamw_torch"),
                                 train_dataset=_dataset(), processing_class=tokenizer, callbacks=[snapshots])
    backwards = [0]

    def poison(grad):
        backwards[0] += 1
        return grad * float("inf") if backwards[0] == 2 else grad

    weight = trainer.model.model.layers[0].mlp.up_proj.weight
    handle = weight.register_hook(poison)
    try:
        trainer.train()
    finally:
        handle.remove()
    first, second, _ = snapshots.params
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert trainer.optimizer.state[weight]["step"] == 2  # AdamW stepped twice in three steps: its state is untouched
    assert trainer.state.log_history[-2]["skipped_steps"] == 1


def test_diverged_parameters_raise_naming_one(tokenizer, tmp_path):
    class Diverge(TrainerCallback):  # what an overflowing fp16 update does to a weight
        def on_step_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("inf")

    trainer = _fp16_trainer(tokenizer, tmp_path, callbacks=[Diverge()])
    with pytest.raises(RuntimeError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight.*diverged"):
        trainer.train()


# --------------------------------------------------------------------------------------------- method names


@pytest.mark.parametrize("name,where", [
    ("ipo", "DPOConfig(loss_type='ipo')"), ("hinge", "DPOConfig(loss_type='hinge')"),
    ("pro-binary", "BinaryFeedbackTrainer(method='pro')"), ("pro-scalar", "ScalarFeedbackTrainer(method='pro')"),
    ("dro", "ScalarFeedbackTrainer(method='dro')"), ("kto", "BinaryFeedbackTrainer(method='kto')"),
    ("edpo", "OracleRewardTrainer(method='edpo')"),
])
def test_method_names_of_other_trainers_point_there(name, where, tokenizer, tmp_path):
    import re

    with pytest.raises(ValueError, match=r"`method` must be one of .*" + re.escape(where)):
        FastPrefDPOTrainer(model=_model(), args=_config(tmp_path), train_dataset=_dataset(),
                           processing_class=tokenizer, method=name)


def test_every_named_trainer_call_is_valid():
    """Each `FastPrefDPOTrainer(method=...)` / `DPOConfig(loss_type=...)` the name table gives is accepted."""
    import re

    from fastpref._method_names import TRAINER_CALLS
    from fastpref.integrations.trl import METHODS

    for name, call in TRAINER_CALLS.items():
        for method in re.findall(r"FastPrefDPOTrainer\(method='([\w-]+)'\)", call):
            assert method in METHODS, (name, call)
        for loss_type in re.findall(r"DPOConfig\(loss_type='([\w-]+)'\)", call):
            assert loss_type in FL.DPO_LOSS_TYPES, (name, call)
