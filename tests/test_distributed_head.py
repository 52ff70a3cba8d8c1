"""The vocabulary-parallel head and context parallelism on 2 CPU processes (gloo), against one process.

One launch runs every case (tests/dist_workers/vocab_context.py); each test below checks one case's numbers on
both ranks. A hang fails the launch after its timeout instead of blocking CI.
"""

from __future__ import annotations

import pytest
import torch

from fastpref import sequence_logprobs
from tests.helpers import make_batch
from tests.dist_workers.launch import launch

OUT_TOL, GRAD_TOL = 1e-6, 1e-5  # fp32, the same backend in one process: outputs and gradients


@pytest.fixture(scope="module")
def results():
    return launch("vocab_context", timeout=300)


def _case(results, name):
    for rank, res in enumerate(results):
        assert name in res, f"rank {rank} did not run {name}"
        assert "error" not in res[name], f"rank {rank}:\n{res[name]['error']}"
    return [res[name] for res in results]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tensor_parallel_dtensor_head_matches_one_process(results, backend):
    """ColwiseParallel on a Linear head (uneven Shard(0): 151 + 150 rows), bias, logit scale, softcap: log-probs,
    dH, the sharded dW/db and the head after one SGD step equal one process; no rank gathers the head."""
    for r in _case(results, f"tp_dtensor-{backend}"):
        assert max(r["response"], r["prompt"], r["tokens"], r["n_response"]) < OUT_TOL, r
        assert max(r["dh"], r["dw"], r["db"]) < GRAD_TOL, r
        assert r["grad_is_dtensor"] == 1.0
        assert max(r["weight_after_step"], r["bias_after_step"]) < GRAD_TOL, r


@pytest.mark.parametrize("case", ["tp_raw-torch", "tp_raw-triton", "tp_raw_mean-torch"])
def test_tensor_parallel_raw_shard_matches_one_process(results, case):
    """A plain local shard with ``vocab_parallel_group`` and ``vocab_range`` (117 + 184 rows): each rank's dW rows
    are its rows of the whole gradient; dH is the whole dH on every rank."""
    for r in _case(results, case):
        assert max(r["response"], r["prompt"], r["tokens"], r["n_response"], r["no_grad"]) < OUT_TOL, r
        assert max(r["dh"], r["dw"], r["db"]) < GRAD_TOL, r


@pytest.mark.parametrize("case", ["cp-torch", "cp-triton", "cp_mean-torch"])
def test_context_parallel_matches_one_process(results, case):
    """Each rank holds half of every sequence (some sequences have no scored token on rank 1): the totals, counts
    and means are the whole sequences'; dH is each rank's rows; dW and db are summed across the group."""
    ranks = _case(results, case)
    assert ranks[1]["sequences_with_no_local_token"] > 0  # the global (not local) empty-sequence check is exercised
    for r in ranks:
        assert max(r["response"], r["prompt"], r["tokens"], r["n_response"]) < OUT_TOL, r
        assert max(r["dh"], r["dw"], r["db"]) < GRAD_TOL, r


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_context_parallel_frozen_head(results, backend):
    for r in _case(results, f"cp_frozen_head-{backend}"):
        assert max(r["response"], r["prompt"], r["tokens"]) < OUT_TOL and r["dh"] < GRAD_TOL, r


@pytest.mark.parametrize("case", ["tp_stats_dtensor-torch", "tp_stats_dtensor-triton", "tp_stats_raw-torch",
                                  "tp_stats_raw-triton", "tp_stats_raw_mean-torch", "cp_stats-torch",
                                  "cp_stats-triton"])
def test_token_statistics_of_a_distributed_head_match_one_process(results, case):
    """``return_stats=True`` with a vocabulary-parallel head (the statistics merged across the shards: argmax ==
    label judged over the whole vocabulary) or context parallelism (segment sums over the group): per-token and
    per-segment entropy, log sum p^2, mean logit and argmax == label equal one process, and a loss with an entropy
    term gives the same dH, dW and db (the entropy's gradient runs through each shard's backward)."""
    ranks = _case(results, case)
    assert sum(r["token_argmax_hits"] for r in ranks) > 0
    for r in ranks:
        assert r["token_argmax_mismatches"] == 0, r
        assert max(v for k, v in r.items() if k.startswith(("token_", "response_", "prompt_"))
                   and not k.startswith(("token_argmax",))) < OUT_TOL, r
        assert max(r["dh"], r["dw"], r["db"]) < GRAD_TOL, r


def test_a_rank_rejecting_its_input_makes_every_rank_raise(results):
    """Rank 1's shard holds a NaN: it raises that, rank 0 raises that another rank rejected its input, with the same
    exception type (a trainer skipping NonFiniteError steps then skips on every rank). No hang."""
    r0, r1 = _case(results, "agree_on_local_error")
    assert r1["raised"] == "NonFiniteError" and "non-finite" in r1["message"]
    assert r0["raised"] == "NonFiniteError" and "another rank" in r0["message"]


def test_shard0_dtensor_over_ranks_with_different_data_is_refused(results):
    """A Shard(0) head over ranks that hold different batches (FSDP's data-parallel sharding, not tensor
    parallelism) would give silently wrong log-probs: every rank raises."""
    for r in _case(results, "different_batches"):
        assert r["raised"] == "ValueError" and "different batches" in r["message"], r


def test_label_checked_against_the_whole_vocabulary(results):
    for r in _case(results, "label_out_of_range"):
        assert r["raised"] == "ValueError" and "outside [0, 301)" in r["message"], r


def test_vocab_ranges_must_tile_the_vocabulary(results):
    for r in _case(results, "ranges_do_not_tile"):
        assert r["raised"] == "ValueError" and "tile" in r["message"], r


def test_context_parallel_sequence_without_tokens_anywhere(results):
    for r in _case(results, "cp_empty_sequence"):
        assert r["raised"] == "ValueError" and "no scored token" in r["message"], r
        assert "every rank" in r["message"], r


# ---------------------------------------------------------------------------------------- one process, no group


def test_distributed_arguments_are_validated_before_any_collective():
    h, w, labels, seg, _ = make_batch(B=2, T=5, D=8, V=17)
    with pytest.raises(TypeError, match="vocab_parallel_group"):
        sequence_logprobs(h, w, labels, seg, vocab_parallel_group="tp", vocab_range=(0, 17))
    with pytest.raises(ValueError, match="needs both"):
        sequence_logprobs(h, w, labels, seg, vocab_range=(0, 17))
    with pytest.raises(TypeError, match="context_parallel_group"):
        sequence_logprobs(h, w, labels, seg, context_parallel_group=object())



def test_sequence_logprobs_fields_are_independent_tensors():
    """FSDP2 registers its pre-backward hook on each output; an in-place op on a view of a shared buffer would drop
    it (issue 11, item 7): every field owns its storage."""
    h, w, labels, seg, _ = make_batch(B=3, T=6, D=8, V=17)
    out = sequence_logprobs(h, w.requires_grad_(), labels, seg, backend="torch", return_token_logps=True)
    fields = [out.response, out.prompt, out.n_response, out.n_prompt, out.token_logps]
    assert all(f._base is None for f in fields[:4])  # the per-sequence fields: no views of a [S, 2] buffer
    assert len({f.untyped_storage().data_ptr() for f in fields}) == len(fields)


def test_tp_head_benchmark_smoke(tmp_path):
    """benchmarks/tp_head.py (the first multi-GPU run's script) end to end on 2 CPU processes, tiny shapes."""
    import json

    from benchmarks import tp_head

    assert tp_head.main(["--smoke", "--out", str(tmp_path), "--timeout-s", "240"]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "tp_head.json").read_text())["rows"]}
    assert set(rows) == {"single", "tp-raw", "tp-dtensor"}
    assert rows["single"]["world"] == 1 and rows["tp-raw"]["world"] == 2
    for name in ("tp-raw", "tp-dtensor"):
        r = rows[name]
        assert r["median_ms"] > 0 and r["loss_rel_err"] < 1e-5, r
        assert r["dw_rel_err"] < 1e-5 and r["dh_rel_err"] < 1e-2, r  # bf16 dH: one rounding per shard
