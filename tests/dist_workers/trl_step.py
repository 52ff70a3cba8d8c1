"""Worker: one FastPrefDPOTrainer step under accelerate (DDP, FSDP2 or DeepSpeed ZeRO-3), methods dpo / auxdpo /
drdo; ``reference`` runs the same step in one process.

Two steps over a dataset of exactly one global batch of 4 pairs, with SGD and no clipping: 2 pairs per rank on 2
ranks, against one process accumulating gradients over two micro-batches of 2 pairs (what data parallelism is
equivalent to for any loss: AuxDPO's null-space penalty ``||A_B delta_B||^2`` is quadratic in its micro-batch, not a
mean). Every parameter (the model's and the trainer's own: AuxDPO's ``delta_raw``, DRDO's reward head) must equal
the one-process update. Each rank writes its
parameters to ``<FASTPREF_OUT>/<mode>-<method>-rank<r>.pt``.

accelerate leaves FSDP off for a CPU run (its FSDP switch only covers GPU-like devices) and counts one process under
DeepSpeed without a GPU: :func:`_force_fsdp_on_cpu` and :func:`_force_deepspeed_on_cpu` fix that, and the worker
reports that the trainer really holds FSDP2 units / a partitioned ZeRO-3 head on 2 processes (else it would test
DDP, or one process).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.dist_workers.common import report, run_cases  # noqa: E402

import torch  # noqa: E402

MODE = sys.argv[1]  # reference | ddp | fsdp2 | zero3
# "feedback": AuxDPOTrainer, a feedback trainer (run under reference and ddp only)
METHODS = sys.argv[2:] or ["dpo", "auxdpo", "drdo"] + (["feedback"] if MODE in ("reference", "ddp") else [])
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
WORDS = [f"w{i}" for i in range(60)]
PAIRS = 4

if MODE == "zero3":
    import deepspeed.comm.torch  # noqa: F401,E402

    # (see tests/dist_workers/zero3.py: a ~2.5 min C++ build of a CPU all-reduce that gloo replaces here)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _force_fsdp_on_cpu():
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def _force_deepspeed_on_cpu():
    """accelerate starts DeepSpeed's process group on a machine without GPUs but then counts one process (it finds no
    device backend): give its state the process group's real size and rank."""
    import torch.distributed as dist
    from accelerate.state import PartialState

    original = PartialState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if dist.is_initialized() and self.num_processes != dist.get_world_size():
            self.num_processes, self.process_index = dist.get_world_size(), dist.get_rank()
            self.local_process_index = int(os.environ["LOCAL_RANK"])

    PartialState.__init__ = init


def _tokenizer():
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _dataset():
    import datasets

    g = torch.Generator().manual_seed(5)

    def words(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    rows = []
    for i in range(PAIRS):
        row = {"prompt": words(2, 5), "chosen": " " + words(2, 6), "rejected": " " + words(2, 6),
               "oracle_chosen": float(torch.randn(1, generator=g)),
               "oracle_rejected": float(torch.randn(1, generator=g))}
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    return model


def _config(method):
    from trl import DPOConfig

    kw = dict(output_dir=os.path.join(os.environ["FASTPREF_OUT"], f"{MODE}-{method}"),
              per_device_train_batch_size=PAIRS // 2, gradient_accumulation_steps=2 // WORLD, max_steps=2,
              report_to=[], save_strategy="no",
              logging_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", seed=0,
              max_grad_norm=0.0, disable_tqdm=True, dataloader_num_workers=0, bf16=False, beta=0.5)
    if MODE in ("reference", "ddp"):
        kw["use_cpu"] = True
    if MODE == "fsdp2":
        kw.update(use_cpu=True, fsdp="full_shard", fsdp_config={
            "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "reshard_after_forward": True})
    if MODE == "zero3":
        kw["deepspeed"] = {
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    return DPOConfig(**kw)


def _params(trainer):
    """Every trainable parameter, whole, by name (the model's and the trainer's own)."""
    model = trainer.model_wrapped if MODE == "zero3" else trainer.model
    named = [(n.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1) if MODE == "zero3" else n, p)
             for n, p in model.named_parameters()]
    out = {}
    if MODE == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            out = {n: p.detach().clone() for n, p in named}
    else:
        for n, p in named:
            out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    for n, p in trainer.fastpref_modules.named_parameters():
        out["fastpref_modules." + n] = p.detach().clone()
    return out


def step(method):
    from fastpref.trainers import FastPrefDPOTrainer

    kwargs = {"method": method}
    if method == "auxdpo":
        kwargs["method_kwargs"] = {"lambda_null": 0.7, "lambda_amp": 0.05}
    model = _model()
    ref = _model()  # TRL builds a reference for every method (the reference-free ones do not run it)
    trainer = FastPrefDPOTrainer(model, ref, args=_config(method), train_dataset=_dataset(),
                                 processing_class=_tokenizer(), fastpref_backend="torch", **kwargs)
    if method == "auxdpo":  # its random initialization is drawn after the wrappers': the same start everywhere
        with torch.no_grad():
            trainer.delta_raw.copy_(torch.randn(trainer.delta_raw.shape, generator=torch.Generator().manual_seed(9)))
    trainer.train()
    facts = {"world": float(trainer.accelerator.num_processes)}
    if MODE == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        facts["fsdp2_units"] = float(sum(isinstance(m, FSDPModule) for m in trainer.model.modules()))
        facts["fsdp_enabled"] = float(trainer.is_fsdp_enabled)
    if MODE == "zero3":
        plugin = trainer.accelerator.state.deepspeed_plugin
        facts["zero_stage"] = float(plugin.zero_stage)
        head = trainer.model_wrapped.module.lm_head.weight
        facts["head_partitioned"] = float(head.numel() == 0)
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    facts.update({k: float(log[k]) for k in ("loss", "logps/chosen", "logps/rejected")})
    rank = int(os.environ.get("RANK", "0"))
    torch.save(_params(trainer), os.path.join(os.environ["FASTPREF_OUT"], f"{MODE}-{method}-rank{rank}.pt"))
    return facts


def feedback_step():
    """``AuxDPOTrainer`` (a feedback trainer: ``transformers.Trainer``, its own ``delta_raw``), reference / ddp.
    Each DDP rank starts ``delta_raw`` from different values and rank 0 holds the reference's: the trainer must
    broadcast rank 0's before training and average the gradients after every backward."""
    from transformers import TrainingArguments

    from fastpref.trainers import AuxDPOTrainer

    g = torch.Generator().manual_seed(7)
    ids = lambda n: torch.randint(3, 64, (n,), generator=g).tolist()  # noqa: E731
    data = [{"prompt_input_ids": ids(2 + i % 3), "chosen_input_ids": ids(2 + i % 2), "rejected_input_ids": ids(3)}
            for i in range(PAIRS)]
    args = TrainingArguments(output_dir=os.path.join(os.environ["FASTPREF_OUT"], f"{MODE}-feedback"),
                             per_device_train_batch_size=PAIRS // 2, gradient_accumulation_steps=2 // WORLD,
                             max_steps=2, report_to=[], save_strategy="no", logging_steps=1, learning_rate=0.5,
                             optim="sgd", lr_scheduler_type="constant", seed=0, max_grad_norm=0.0, disable_tqdm=True,
                             dataloader_num_workers=0, use_cpu=True, remove_unused_columns=False)
    trainer = AuxDPOTrainer(_model(), args, ref_model=_model(), train_dataset=data, beta=0.5, lambda_null=0.7,
                            lambda_amp=0.05, delta_learning_rate=0.5, backend="torch")
    rank = int(os.environ.get("RANK", "0"))
    with torch.no_grad():
        raw = trainer.offsets.delta_raw
        raw.copy_(torch.randn(raw.shape, generator=torch.Generator().manual_seed(9 + rank)))
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    facts = {"world": float(trainer.accelerator.num_processes)}
    facts.update({k: float(log[k]) for k in ("loss", "logps/chosen", "logps/rejected")})
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    params["fastpref_modules.delta_raw"] = trainer.offsets.delta_raw.detach().clone()
    torch.save(params, os.path.join(os.environ["FASTPREF_OUT"], f"{MODE}-feedback-rank{rank}.pt"))
    return facts


if __name__ == "__main__":
    if MODE == "fsdp2":
        _force_fsdp_on_cpu()
    if MODE == "zero3":
        _force_deepspeed_on_cpu()
    if MODE == "reference":
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(name, None)
    cases = {m: (lambda m=m: step(m)) for m in METHODS if m != "feedback"}
    if "feedback" in METHODS:
        cases["feedback"] = feedback_step
    report(run_cases(cases))
