"""The demo's plain training loop: a tiny Llama built from a config, an SFT warm-up, then each method in turn.

Every method starts from the same SFT weights; the frozen SFT model is the reference. The policy is patched with
:func:`fastpref.integrations.transformers.patch` and called with ``logps_only=True``, so no logits tensor is ever
built; the losses are :mod:`fastpref.losses.functional`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib
import resource
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

from .data import REF_SAMPLE, DemoData, Split
from ._layout import K
from fastpref.losses.auxdpo import DEFAULT_INIT_STD

from .methods import EXTRA_LEARNING_RATES, METHODS, Batch, Context, MethodSpec

__all__ = ["DEFAULT_SFT_STEPS", "DEFAULT_STEPS", "DemoConfig", "MethodResult", "build_model", "check_config", "run",
           "TIE_TOLERANCE"]

DEFAULT_STEPS = 120  # per method: the default run (10 methods) takes ~30-60 s on 2 shared CPU cores
DEFAULT_SFT_STEPS = 100
TIE_TOLERANCE = 1e-4  # |score margin| below this counts as a tie (half right): fp32 rounding of ~-30-nat sums


@dataclasses.dataclass
class DemoConfig:
    methods: Sequence[str]
    steps: int = DEFAULT_STEPS
    sft_steps: int = DEFAULT_SFT_STEPS
    batch_pairs: int = 16
    lr: Optional[float] = None  # None: each method's own default
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    eval_points: int = 10
    hidden_size: int = 48
    layers: int = 2
    progress: bool = True
    threads: Optional[int] = 1  # CPU threads while training (None: leave torch's setting)


@dataclasses.dataclass
class MethodResult:
    method: str
    title: str
    final_loss: float  # mean training loss over the last min(5, steps) steps
    acc_before: float  # held-out reward accuracy of the initial (SFT) model under this method's score
    acc_after: float
    chosen_logp_change: float  # mean over held-out chosen responses of logp_after - logp_before (nats)
    rejected_logp_change: float  # the same for the held-out rejected responses
    tokens_per_s: float  # non-padding tokens through the policy per second of training
    peak_memory_mb: float
    memory_kind: str  # "cuda max allocated" | "process peak RSS"
    seconds: float
    losses: list = dataclasses.field(default_factory=list)
    eval_steps: list = dataclasses.field(default_factory=list)
    eval_accs: list = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------------ model


def build_model(vocab_size: int, hidden_size: int = 48, layers: int = 2, seed: int = 0):
    """A tiny ``LlamaForCausalLM`` from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=3, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def _logps(model, split: Split, prompts, columns):
    ids, att, seg = split.sequences(prompts, columns)
    return model(input_ids=ids, attention_mask=att, segment_ids=seg, logps_only=True)


@torch.no_grad()
def _all_logps(model, split: Split, batch_rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Response and prompt log-probs of every sequence ``[P, K+1]`` of a split."""
    P, C = split.ids.shape[:2]
    device = split.ids.device
    prompts = torch.arange(P, device=device).repeat_interleave(C)
    columns = torch.arange(C, device=device).repeat(P)
    resp, prompt = [], []
    for start in range(0, P * C, batch_rows):
        out = _logps(model, split, prompts[start:start + batch_rows], columns[start:start + batch_rows]).logps
        resp.append(out.response.float())
        prompt.append(out.prompt.float())
    return torch.cat(resp).reshape(P, C), torch.cat(prompt).reshape(P, C)


def _eval_rows(split: Split):
    """Held-out pairs: all chosen rows, then all rejected rows (one fixed batch)."""
    P = split.num_prompts
    idx = torch.arange(P, device=split.ids.device)
    return torch.cat([idx, idx]), torch.cat([split.chosen, split.rejected])


@torch.no_grad()
def _evaluate(model, spec: MethodSpec, split: Split, ref_test: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(held-out accuracy under the method's score, log-probs [2P]: the chosen responses, then the rejected)."""
    model.eval()
    prompts, columns = _eval_rows(split)
    lp = _logps(model, split, prompts, columns).logps
    model.train()
    P = split.num_prompts
    resp = lp.response.float()
    if spec.score == "implicit":
        score = resp - ref_test[prompts, columns]
    elif spec.score == "avg_logp":
        score = resp / lp.n_response.float().clamp(min=1)
    else:
        score = resp
    margin = score[:P] - score[P:]
    right = (margin > TIE_TOLERANCE).float() + 0.5 * (margin.abs() <= TIE_TOLERANCE).float()
    return float(right.mean()), resp


# ------------------------------------------------------------------------------------------------ batches


class _Sampler:
    def __init__(self, split: Split, spec: MethodSpec, batch_pairs: int, seed: int, ref_resp, ref_prompt):
        self.split, self.spec, self.n = split, spec, batch_pairs
        self.generator = torch.Generator().manual_seed(seed)
        self.ref_resp, self.ref_prompt = ref_resp, ref_prompt
        self.device = split.ids.device

    def __call__(self) -> Batch:
        s, n, dev = self.split, self.n, self.device
        if self.spec.layout == "groups":  # n/2 prompts x K responses = 2n rows, as many as n pairs
            g = max(1, (2 * n) // K)
            p = torch.randperm(s.num_prompts, generator=self.generator)[:g].to(dev)
            prompts = p.repeat_interleave(K)
            columns = torch.arange(K, device=dev).repeat(g)
            group_ids = torch.arange(g, device=dev).repeat_interleave(K)
            num_pairs = 0
        else:
            p = torch.randperm(s.num_prompts, generator=self.generator)[:n].to(dev)
            parts_p, parts_c = [p, p], [s.chosen[p], s.rejected[p]]
            if self.spec.layout == "pairs+unsup":
                parts_p.append(p)
                parts_c.append(torch.full_like(p, REF_SAMPLE))
            prompts, columns = torch.cat(parts_p), torch.cat(parts_c)
            group_ids = torch.zeros_like(prompts)
            num_pairs = p.numel()
        is_response = columns < K
        safe = columns.clamp(max=K - 1)
        rewards = torch.where(is_response, s.rewards[prompts, safe], 0.0)
        labels = torch.where(is_response, s.labels[prompts, safe], 0)
        return Batch(prompts, columns, rewards, labels, group_ids,
                     self.ref_resp[prompts, columns], self.ref_prompt[prompts, columns], num_pairs)


# ------------------------------------------------------------------------------------------------ memory, progress


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "process peak RSS"


class _TextBar:
    """A one-line progress bar on stderr for when tqdm is not installed."""

    def __init__(self, total: int, desc: str, width: int = 24):
        self.total, self.desc, self.width, self.n, self.postfix = total, desc, width, 0, ""
        self.start = time.perf_counter()
        self._draw()

    def update(self, k: int = 1):
        self.n += k
        if self.n == self.total or self.n % max(1, self.total // 50) == 0:
            self._draw()

    def set_postfix_str(self, s: str):
        self.postfix = s

    def _draw(self):
        filled = int(self.width * self.n / max(1, self.total))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {elapsed:5.1f}s {self.postfix}")
        sys.stderr.flush()

    def close(self):
        self._draw()
        sys.stderr.write("\n")
        sys.stderr.flush()


class _NoBar:
    def update(self, k: int = 1):
        pass

    def set_postfix_str(self, s: str):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=True, dynamic_ncols=True, mininterval=0.2)


# ------------------------------------------------------------------------------------------------ run


def _sft(model, split: Split, cfg: DemoConfig, progress: bool) -> list[float]:
    """Warm-up: response-token NLL on every training sequence (the reference distribution)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    P, C = split.ids.shape[:2]
    rows = 4 * cfg.batch_pairs
    bar = _progress(cfg.sft_steps, f"{'sft warm-up':>11}", progress)
    losses = []
    for _ in range(cfg.sft_steps):
        flat = torch.randperm(P * C, generator=gen)[:rows].to(split.ids.device)
        lp = _logps(model, split, flat // C, flat % C).logps
        loss = -lp.response.sum() / lp.n_response.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        bar.update()
    bar.set_postfix_str(f"nll/token {float(losses[-1]):.3f}" if losses else "")
    bar.close()
    return [float(x) for x in losses]


def run(data: DemoData, cfg: DemoConfig) -> tuple[list[MethodResult], dict]:
    """Train every method in ``cfg.methods``; returns the per-method results and run info.

    On the CPU the run uses ``cfg.threads`` threads (default 1: for a model this small, more threads mostly
    wait on each other, and on shared cores they can be many times slower); the setting is restored after.
    """
    device = torch.device(cfg.device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(data, cfg, device)
    finally:
        torch.set_num_threads(threads)


def check_config(cfg: DemoConfig, data: DemoData) -> None:
    """Raise ValueError for settings the data cannot serve (before anything is trained)."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; choose from {list(METHODS)}")
    if cfg.batch_pairs > data.train.num_prompts:
        raise ValueError(f"batch_pairs={cfg.batch_pairs} exceeds the {data.train.num_prompts} training prompts: a "
                         "batch draws distinct prompts (one pair per prompt)")


def _run(data: DemoData, cfg: DemoConfig, device: torch.device) -> tuple[list[MethodResult], dict]:
    from fastpref.integrations.transformers import patch

    check_config(cfg, data)

    data = data.to(device)
    torch.manual_seed(cfg.seed)
    base = build_model(data.vocab_size, cfg.hidden_size, cfg.layers, cfg.seed).to(device)
    patch(base, backend=cfg.backend)
    base.train()
    t0 = time.perf_counter()
    sft_losses = _sft(base, data.train, cfg, cfg.progress)
    sft_seconds = time.perf_counter() - t0
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    reference = base  # frozen SFT model
    ref_train_resp, ref_train_prompt = _all_logps(reference, data.train)
    ref_test, _ = _all_logps(reference, data.test)
    init_state = copy.deepcopy(base.state_dict())
    test_prompts, test_columns = _eval_rows(data.test)
    ref_test_pairs = ref_test[test_prompts, test_columns]  # chosen then rejected
    info = {"sft_steps": cfg.sft_steps, "sft_seconds": sft_seconds,
            "sft_final_nll": sft_losses[-1] if sft_losses else float("nan"),
            "uniform_nll": math.log(data.vocab_size - 4) if data.vocab_size > 4 else float("nan"),
            "num_parameters": sum(p.numel() for p in base.parameters()),
            "backend": _resolved_backend(cfg.backend, device), "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "steps": cfg.steps, "batch_pairs": cfg.batch_pairs, "seed": cfg.seed,
            "model": f"LlamaForCausalLM(vocab {data.vocab_size}, hidden {cfg.hidden_size}, {cfg.layers} layers)",
            "train_prompts": data.train.num_prompts, "test_pairs": data.test.num_prompts}

    results = []
    for m, name in enumerate(cfg.methods):
        spec = METHODS[name]
        method_seed = cfg.seed + zlib.crc32(name.encode())  # a method's run does not depend on the others
        torch.manual_seed(method_seed)
        policy = build_model(data.vocab_size, cfg.hidden_size, cfg.layers, cfg.seed).to(device)
        policy.load_state_dict(init_state)
        patch(policy, backend=cfg.backend)
        policy.train()
        ctx = _context(spec, data, reference, policy, cfg)
        params = list(policy.parameters())
        lr = cfg.lr if cfg.lr is not None else spec.lr
        groups = [{"params": params, "lr": lr}]
        for key, v in ctx.extras.items():  # method-owned parameters: their own group (AuxDPO's offsets: 5e-3)
            groups.append({"params": list(v.parameters()) if isinstance(v, nn.Module) else [v],
                           "lr": EXTRA_LEARNING_RATES.get(key, lr)})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        sampler = _Sampler(data.train, spec, cfg.batch_pairs, method_seed,
                           ref_train_resp, ref_train_prompt)
        acc0, _ = _evaluate(policy, spec, data.test, ref_test)
        eval_every = max(1, cfg.steps // max(1, cfg.eval_points))
        eval_steps, eval_accs, losses = [0], [acc0], []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        bar = _progress(cfg.steps, f"{name:>11}", cfg.progress)
        tokens, train_time = 0, 0.0
        for step in range(1, cfg.steps + 1):
            start = time.perf_counter()
            batch = sampler()
            out = _logps(policy, data.train, batch.prompts, batch.columns)
            loss, _ = spec.loss(out.logps, out.last_hidden, batch, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # the policy; method-owned parameters are not clipped
            opt.step()
            losses.append(loss.detach())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - start
            tokens += int(data.train.attention[batch.prompts, batch.columns].sum())
            if step % eval_every == 0 or step == cfg.steps:
                acc, _ = _evaluate(policy, spec, data.test, ref_test)
                eval_steps.append(step)
                eval_accs.append(acc)
                bar.set_postfix_str(f"loss {float(loss.detach()):.3f} acc {acc:.3f}")
            bar.update()
        bar.close()
        acc1, pairs_after = _evaluate(policy, spec, data.test, ref_test)
        change = (pairs_after - ref_test_pairs).reshape(2, -1).mean(dim=1)  # chosen, rejected
        peak, kind = _peak_memory(device)
        loss_values = [float(x) for x in torch.stack(losses).float().cpu()] if losses else []
        tail = loss_values[-min(5, len(loss_values)):]
        results.append(MethodResult(
            method=name, title=spec.title, final_loss=sum(tail) / max(1, len(tail)), acc_before=acc0,
            acc_after=acc1, chosen_logp_change=float(change[0]), rejected_logp_change=float(change[1]),
            tokens_per_s=tokens / max(train_time, 1e-9), peak_memory_mb=peak, memory_kind=kind,
            seconds=train_time, losses=loss_values, eval_steps=eval_steps, eval_accs=eval_accs))
        del policy, opt, ctx
    return results, info


def _resolved_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "torch"


def _context(spec: MethodSpec, data: DemoData, reference, policy, cfg: DemoConfig) -> Context:
    device = data.train.ids.device
    if spec.name == "auxdpo":
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)  # the authors' init: delta_raw ~ N(0, 1e-3)
        delta_raw = nn.Parameter((torch.randn(data.train.num_prompts, 2, generator=g) * DEFAULT_INIT_STD).to(device))
        backbone = reference.get_decoder() if hasattr(reference, "get_decoder") else reference.model

        @torch.no_grad()
        def ref_hidden(batch: Batch):
            ids, att, seg = data.train.sequences(batch.prompts, batch.columns)
            hidden = backbone(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
            labels = torch.full_like(ids, -100)
            rows = torch.zeros_like(seg)
            rows[:, :-1] = torch.where((seg[:, 1:] == 2) & (att[:, :-1] > 0), 2, 0)  # row t predicts token t+1
            labels[:, :-1] = torch.where(rows[:, :-1] == 2, ids[:, 1:], -100)
            return hidden.float(), labels, rows

        weight = reference.get_output_embeddings().weight.detach().float()
        return Context({"delta_raw": delta_raw}, ref_hidden, weight)
    if spec.name == "drdo":
        head = nn.Linear(cfg.hidden_size, 1).to(device)
        return Context({"reward_head": head})
    return Context({})
