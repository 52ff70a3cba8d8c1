"""The TRL drop-in on the GPU: ``FastPrefDPOTrainer`` against stock ``DPOTrainer`` and ``use_liger_kernel=True``.

A ~100M-parameter Llama built from a config (Llama-3 vocabulary of 128,256 tokens, hidden 512, 8 layers, tied
embeddings as small Llamas have: 66M of the parameters are the embedding/head matrix), random weights, a synthetic tokenized preference
dataset (prompt 256-512 tokens, completions 256-512), bf16, the same batches for each trainer. Each trainer
runs ``--warmup`` steps then ``--steps`` timed steps; a callback records the wall time of every step
(synchronized) and the peak allocated memory. The first step's loss of each trainer is recorded to show they
train the same objective.

    python -m benchmarks.trl_step --out benchmarks/results/DATE-trl                # on the GPU
    python -m benchmarks.trl_step --smoke --out /tmp/trl                           # tiny, CPU, what CI runs
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time

import torch

from .common import guarded, markdown_table, versions, write_results


def _tokenizer(vocab_size: int):
    """A word-level tokenizer whose words are ``w0 .. wN``: any vocabulary size, nothing downloaded."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _dataset(n: int, vocab_size: int, prompt_len: tuple[int, int], completion_len: tuple[int, int], seed: int = 0):
    import datasets

    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(0, vocab_size - 3, (k,), generator=g))

    return datasets.Dataset.from_list([{"prompt": text(*prompt_len), "chosen": " " + text(*completion_len),
                                        "rejected": " " + text(*completion_len)} for _ in range(n)])


def _model(a, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                         num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _callback(device):
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append((time.perf_counter() - self.t0) * 1e3)

    return StepTimes()


def run_one(name, a, device, tokenizer, data, model):
    from trl import DPOConfig, DPOTrainer

    from fastpref.trainers import FastPrefDPOTrainer

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.warmup + a.steps,
                        learning_rate=1e-5, logging_steps=1, report_to=[], save_strategy="no", seed=0,
                        bf16=device.type == "cuda", use_cpu=device.type != "cuda", max_length=a.max_length,
                        use_liger_kernel=name == "liger", disable_tqdm=True, dataloader_num_workers=0,
                        beta=0.1, loss_type="sigmoid")
        cls = FastPrefDPOTrainer if name == "fastpref" else DPOTrainer
        cb = _callback(device)
        trainer = cls(model=model, ref_model=copy.deepcopy(model), args=cfg, train_dataset=data,
                      processing_class=tokenizer, callbacks=[cb])
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        timed = sorted(cb.times[a.warmup:])
        row = {"impl": name, "median_step_ms": timed[len(timed) // 2], "min_step_ms": timed[0],
               "first_loss": losses[0] if losses else None,
               "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None,
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
        del trainer
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="pairs per device step")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--impls", default="stock,liger,fastpref")
    ap.add_argument("--smoke", action="store_true", help="tiny model on whatever device there is (CI)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompt_len, completion_len = (256, 512), (256, 512)
    if a.smoke:
        a.vocab, a.hidden, a.layers, a.batch, a.max_length, a.warmup, a.steps = 64, 32, 1, 2, 64, 1, 1
        prompt_len, completion_len = (3, 6), (3, 6)
        a.impls = ",".join(i for i in a.impls.split(",") if i != "liger")  # Liger needs CUDA
    elif device.type != "cuda":
        sys.exit("trl_step: no CUDA device; run with --smoke on a CPU")
    meta = versions()
    meta.update({k: v for k, v in vars(a).items() if k != "out"})
    tokenizer = _tokenizer(a.vocab)
    data = _dataset(a.batch * (a.warmup + a.steps), a.vocab, prompt_len, completion_len)
    rows = []
    for name in a.impls.split(","):
        row = guarded(name, lambda: run_one(name, a, device, tokenizer, data, _model(a).to(device)), device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = (f"# TRL DPO training step, ~{rows[0].get('params_m', 0):.0f}M-parameter Llama "
             f"({meta['device']}, torch {meta['torch']}, trl {meta['trl']}, {meta['date']})\n\n")
    table += markdown_table(rows, [("impl", "trainer", ""), ("median_step_ms", "median step ms", ".1f"),
                                   ("peak_gib", "peak GiB", ".2f"), ("first_loss", "first loss", ".5f"),
                                   ("error", "error", "")])
    write_results(a.out, "trl_step", meta, rows, table)
    print(table)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
