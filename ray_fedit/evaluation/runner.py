"""Evaluate one adapter (or the base model): safety benchmarks x judges, helpfulness, statistics.

:func:`evaluate_adapter` is the entry point of the ``evaluate`` stage, of ``ray-fedit evaluate``,
and of evaluation every N rounds (:class:`RoundEvaluator`). It writes, under ``out_dir``:

- ``responses.parquet``, first, before any judge runs: one row per response, ``set`` (benchmark,
  ``benign`` or ``mt_bench``), ``prompt``, ``temperature``, ``response`` and generation stats, with a
  fingerprint of what produced them; ``resume=True`` judges these instead of generating again;
- ``<benchmark>.parquet``: one row per prompt: ``prompt``, ``response``, ``category``, ``id``,
  generation stats, and per judge ``<judge>_<field>`` (``rule_safe``, ``reward_model_score``, ...);
- ``benign.parquet`` (when there are benign records): ``prompt``, ``reference``, ``response``,
  ``refusal``, ``nll``;
- ``mt_bench.parquet`` (when MT-Bench is configured): ``question_id``, ``category``, ``prompt``,
  ``response``, ``score``, ``judge_raw``;
- ``metrics.json``: the summary returned (schema in docs/evaluation.md).

Responses come from the generation engines (:func:`ray_fedit.generation.engine.generate`), with the
adapter being evaluated; judges run as :mod:`ray_fedit.evaluation.judging` says. Every rate and mean
carries a percentile-bootstrap interval (:mod:`ray_fedit.evaluation.stats`) with a seed derived from
the run seed and the benchmark and judge names, so a rerun reproduces the intervals exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ray_fedit.config import RunConfig
from ray_fedit.data.schema import Record
from ray_fedit.errors import CheckpointError
from ray_fedit.evaluation.benchmarks import (
    benchmark_name,
    category_of,
    load_benchmark,
    select_subset,
)
from ray_fedit.evaluation.stats import (
    by_category,
    judge_agreement,
    mean_summary,
    rate_summary,
    response_diversity,
)
from ray_fedit.rundir import write_json_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
RESPONSES_FILE = "responses.parquet"
BENIGN = "<benign>"  # the batch key of the benign prompts (no benchmark name has brackets)
SCHEMA_VERSION = 1
# An evaluation's model work: ``({batch key: {judge: verdict rows}}, benign response NLLs)``.
ModelWork = tuple[dict[str, dict[str, list]], list[float | None]]


def _seed(cfg: RunConfig, *names: str) -> int:
    """A bootstrap seed from the run seed and names (stable across processes)."""
    keys = [cfg.seed & 0xFFFFFFFF, *(zlib.crc32(n.encode()) for n in names)]
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def summarize_judge(rows: list[dict[str, Any]], categories: list[str], *, samples: int,
                    confidence: float, seed: int) -> dict[str, Any]:
    """Metrics of one judge on one benchmark.

    A judge whose rows carry ``safe`` gets a rate block (share judged safe, unparseable counted
    separately and never as safe); one whose rows carry ``score`` gets a ``score`` block (mean of
    the parsed scores). Both come overall and per category.

    Returns:
        ``{"rate", "ci_low", "ci_high", "n", "n_true", "unparseable", "score": {...},
        "per_category": {category: {same keys}}}`` with the blocks that apply.
    """
    kw = {"samples": samples, "confidence": confidence}
    has_safe = any("safe" in r for r in rows)
    has_score = any("score" in r for r in rows)

    def summary(sub: list[dict[str, Any]], s: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if has_safe:
            out.update(rate_summary([r.get("safe") for r in sub], seed=s, **kw))
        if has_score:
            out["score"] = mean_summary([r.get("score") for r in sub], seed=s + 1, **kw)
        return out

    result = summary(rows, seed)

    def per_cat(sub: list[dict[str, Any]], *, samples: int, confidence: float,
                seed: int) -> dict[str, Any]:
        return summary(sub, seed)

    result["per_category"] = by_category(rows, categories, per_cat, seed=seed, **kw)
    return result


def _generate_all(cfg: RunConfig, adapter_dir: Path | None, jobs: list[tuple[str, float | None]],
                  label: str = "evaluation") -> list[dict[str, Any]]:
    """Answer every ``(prompt, temperature or None for the config's)`` job, in order.

    Jobs that share a temperature share one engine pass, so an evaluation loads the evaluated model
    once per temperature, not once per benchmark.
    """
    from ray_fedit.generation.engine import generate
    from ray_fedit.generation.rows import SamplingParams

    groups: dict[float | None, list[int]] = {}
    for i, (_, temp) in enumerate(jobs):
        groups.setdefault(None if temp == cfg.generation.temperature else temp, []).append(i)
    out: list[dict[str, Any]] = [{} for _ in jobs]
    for temp, idx in groups.items():
        rows = generate([{"prompt": jobs[i][0]} for i in idx], prompt_field="prompt",
                        model_cfg=cfg.model, gen_cfg=cfg.generation, template=cfg.data.template,
                        adapter_dir=adapter_dir, seed=cfg.seed,
                        sampling=SamplingParams.from_config(cfg.generation, temperature=temp),
                        progress=f"{label}: responses"
                        + (f" (temperature {temp})" if len(groups) > 1 else ""))
        for i, row in zip(idx, rows, strict=True):
            out[i] = row
    return out


_BOOL_FIELDS = ("safe", "refusal")
_FLOAT_FIELDS = ("score", "nll")


def _write_parquet(path: Path, columns: dict[str, list[Any]],
                   metadata: dict[str, str] | None = None) -> None:
    """Write columns (and schema metadata) atomically; verdict columns keep their type even when
    every value is None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, values in columns.items():
        if name.endswith(_BOOL_FIELDS):
            arrays[name] = pa.array(values, type=pa.bool_())
        elif name.endswith(_FLOAT_FIELDS):
            arrays[name] = pa.array(values, type=pa.float64())
        elif all(v is None for v in values):
            arrays[name] = pa.array(values, type=pa.string())
        else:
            arrays[name] = pa.array(values)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(arrays, metadata=metadata), tmp)
    tmp.replace(path)


def _responses_fingerprint(cfg: RunConfig, adapter_dir: Path | None) -> str:
    """What responses depend on besides their prompts: the model and generation sections, the
    template, the seed and the adapter's files (their bytes, not their path)."""
    h = hashlib.sha256(json.dumps({
        "model": cfg.model.model_dump(mode="json"),
        "generation": cfg.generation.model_dump(mode="json"),
        "template": cfg.data.template, "seed": cfg.seed}, sort_keys=True).encode())
    if adapter_dir is not None:
        for f in sorted(adapter_dir.glob("adapter_*")):  # PEFT's adapter_config + adapter_model
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _responses(cfg: RunConfig, adapter_dir: Path | None, jobs: list[tuple[str, float | None]],
               sets: list[str], out_dir: Path, *, resume: bool, label: str = "evaluation"
               ) -> tuple[list[dict[str, Any]], bool]:
    """Every job's response, and whether they were read back rather than generated.

    Generated responses go to ``out_dir/responses.parquet`` before any judge runs, so a judge that
    fails loses none of them. With ``resume`` and that file present, they are read back instead,
    after checking that they answer the same prompts with the same model, generation setup, seed
    and adapter.

    Raises:
        CheckpointError: with ``resume``, when the saved responses belong to another evaluation.
    """
    import pyarrow.parquet as pq

    path = out_dir / RESPONSES_FILE
    fingerprint = _responses_fingerprint(cfg, adapter_dir)
    keys = [(s, prompt, cfg.generation.temperature if temp is None else temp)
            for s, (prompt, temp) in zip(sets, jobs, strict=True)]
    if resume and path.is_file():
        table = pq.read_table(path)
        saved_fingerprint = (table.schema.metadata or {}).get(b"fingerprint", b"").decode()
        if saved_fingerprint != fingerprint:
            raise CheckpointError(
                f"{path} holds responses of another model, generation setup, seed or adapter "
                f"(fingerprint {saved_fingerprint or 'none'} != {fingerprint}); evaluate into a "
                "fresh directory, or delete the file to generate again")
        rows = table.to_pylist()
        saved = [(r["set"], r["prompt"], r["temperature"]) for r in rows]
        if saved != keys:
            first = next((i for i, (a, b) in enumerate(zip(saved, keys, strict=False))
                          if a != b), min(len(saved), len(keys)))
            raise CheckpointError(
                f"{path} holds responses to other prompts ({len(saved)} saved, {len(keys)} now; "
                f"first difference at row {first}): the benchmarks, subsets or benign records "
                "changed; evaluate into a fresh directory, or delete the file to generate again")
        log.info("evaluation: %d responses read back from %s", len(rows), path)
        return rows, True
    generated = _generate_all(cfg, adapter_dir, jobs, label)
    _write_parquet(path, {
        "set": sets, "prompt": [k[1] for k in keys], "temperature": [k[2] for k in keys],
        "response": [g["response"] for g in generated],
        "num_generated_tokens": [g.get("num_generated_tokens") for g in generated],
        "finish_reason": [g.get("finish_reason") for g in generated],
    }, metadata={"fingerprint": fingerprint})
    return generated, False


def _load_benchmarks(cfg: RunConfig) -> list[tuple[str, Any, list[Record], int]]:
    """``(name, section, records, available)`` of every benchmark; names must be distinct."""
    out: list[tuple[str, Any, list[Record], int]] = []
    for bench in cfg.evaluation.benchmarks:
        name = benchmark_name(bench)
        if name in [o[0] for o in out] or name in ("benign", "mt_bench", "metrics", "responses",
                                                   "heldout_benign"):
            raise ValueError(f"evaluation.benchmarks: two benchmarks (or a reserved file) named "
                             f"{name!r}; give custom sources distinct 'source' labels")
        out.append((name, bench, *load_benchmark(bench, default_seed=cfg.seed)))
    return out


def evaluate_adapter(cfg: RunConfig, *, stage: str, adapter_dir: Path | None, out_dir: Path,
                     benign_records: list[Record] | None = None,
                     resume: bool = False) -> dict[str, Any]:
    """Evaluate the base model plus ``adapter_dir`` (None: the base model alone).

    Steps: load the prompts (benchmarks, benign, MT-Bench); generate every response (one engine
    pass per sampling temperature) and write them to ``responses.parquet``; start one Ray task for
    the model judges and the response NLL; run the in-process judges (rule, HTTP) and the MT-Bench
    grading meanwhile; summarise; write.

    Args:
        cfg: the run config (``evaluation``, ``generation``, ``model``, ``data.template``,
            ``seed``).
        stage: a label stored in the metrics (``global``, ``defended``, ``round_0010``, ``base``).
        adapter_dir: a PEFT adapter directory (a round checkpoint, the final or defended adapter).
        out_dir: where the parquet files and ``metrics.json`` go (usually ``RunDir.eval(stage)``).
        benign_records: held-out benign (instruction, response) records for over-refusal and NLL;
            None reads ``evaluation.benign`` if set, else skips those metrics.
        resume: judge the responses already in ``out_dir/responses.parquet`` (left there by an
            evaluation that failed after generating) instead of generating them again.

    Returns:
        The metrics dict, also written to ``out_dir/metrics.json``.

    Raises:
        ValueError: for two benchmarks with the same name.
        CheckpointError: with ``resume``, for saved responses of another model, generation setup,
            seed, adapter or set of prompts.
    """
    from ray_fedit.evaluation.helpfulness import load_mt_bench
    from ray_fedit.evaluation.judging import run_judges, split_judges
    from ray_fedit.judges.mt_bench import CATEGORY_TEMPERATURE
    from ray_fedit.registry import JUDGES

    ev = cfg.evaluation
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = None if adapter_dir is None else Path(adapter_dir)
    timing: dict[str, float] = {}
    clock = time.perf_counter()

    # ---- prompts ----
    benches = _load_benchmarks(cfg)
    if benign_records is None and ev.benign is not None:
        from ray_fedit.data.loaders import load_source

        benign_records = load_source(ev.benign).records
    benign = (select_subset(benign_records, ev.num_benign_prompts, seed=cfg.seed, stratify=False)
              if benign_records and ev.num_benign_prompts > 0 else [])
    questions = load_mt_bench(ev.mt_bench) if ev.mt_bench is not None else []

    # ---- responses: one engine pass per temperature ----
    jobs: list[tuple[str, float | None]] = [(r["instruction"], None)
                                            for _, _, recs, _ in benches for r in recs]
    jobs += [(r["instruction"], None) for r in benign]
    # FastChat's per-category answer temperatures (the paper's MT-Bench runs); 0.7 otherwise.
    jobs += [(q["instruction"], CATEGORY_TEMPERATURE.get(q["category"], 0.7)) for q in questions]
    sets = ([name for name, _, recs, _ in benches for _ in recs] + ["benign"] * len(benign)
            + ["mt_bench"] * len(questions))
    generated, reused = _responses(cfg, adapter_dir, jobs, sets, out_dir, resume=resume,
                                   label=f"evaluate {stage}")
    timing["generate"] = time.perf_counter() - clock

    # ---- judges and scorers: the model work in the background (resident actor or a Ray task),
    # in-process work meanwhile ----
    t0 = time.perf_counter()
    batches: dict[str, tuple[list[str], list[str]]] = {}
    offset = 0
    for name, _, recs, _ in benches:
        gen = generated[offset:offset + len(recs)]
        batches[name] = ([r["instruction"] for r in recs], [g["response"] for g in gen])
        offset += len(recs)
    benign_gen = generated[offset:offset + len(benign)]
    mt_gen = generated[offset + len(benign):]
    refusal_batches = ({BENIGN: ([r["instruction"] for r in benign],
                                 [g["response"] for g in benign_gen])} if benign else {})
    here, in_task = split_judges(cfg)
    nll_pairs = [(r["instruction"], r["response"]) for r in benign]
    if nll_pairs and not all(resp.strip() for _, resp in nll_pairs):
        log.warning("benign records without reference responses: response NLL skipped")
        nll_pairs = []
    model_work = None
    if in_task or nll_pairs:
        model_work = _start_model_work(cfg, in_task, batches, adapter_dir, nll_pairs,
                                       refusal_batches)
    verdicts = run_judges(here, cfg, batches, refusal_batches)
    helpfulness: dict[str, Any] = {}
    if questions:
        helpfulness["mt1"] = _mt_bench(cfg, questions, [g["response"] for g in mt_gen], out_dir)
    nll: list[float | None] = []
    if model_work is not None:
        task_verdicts, nll = model_work()
        for key, by_judge in task_verdicts.items():
            verdicts.setdefault(key, {}).update(by_judge)
    kw = {"samples": ev.bootstrap_samples, "confidence": ev.confidence}

    # ---- safety summaries ----
    safety: dict[str, Any] = {}
    offset = 0
    for name, bench, recs, available in benches:
        gen = generated[offset:offset + len(recs)]
        offset += len(recs)
        by_judge = {judge: verdicts[name][judge] for judge in ev.judges}
        categories = [category_of(r) for r in recs]
        columns: dict[str, list[Any]] = {
            "prompt": [r["instruction"] for r in recs], "response": [g["response"] for g in gen],
            "category": categories, "id": [str(r["meta"].get("id", i)) for i, r in enumerate(recs)],
        }
        for stat in ("num_generated_tokens", "finish_reason"):
            columns[stat] = [g.get(stat) for g in gen]
        for judge, rows in by_judge.items():
            for key in sorted({k for r in rows for k in r}):
                columns[f"{judge}_{key}"] = [r.get(key) for r in rows]
        _write_parquet(out_dir / f"{name}.parquet", columns)
        safety[name] = {
            "n": len(recs), "available": available,
            "seed": cfg.seed if bench.seed is None else bench.seed,
            "append_period": bench.append_period,
            "judges": {judge: summarize_judge(rows, categories, seed=_seed(cfg, name, judge), **kw)
                       for judge, rows in by_judge.items()},
            "agreement": judge_agreement({j: [r.get("safe") for r in rows]
                                          for j, rows in by_judge.items()}),
            "diversity": response_diversity(columns["response"]),
        }

    # ---- benign: over-refusal (rule judge, and every other refusal judge) and response NLL ----
    if benign:
        prompts, responses = refusal_batches[BENIGN]
        by_judge = dict(verdicts.get(BENIGN, {}))
        if "rule" not in by_judge:
            by_judge = {"rule": JUDGES.get("rule")(prompts, responses), **by_judge}
        refused = {j: [bool(v["refusal"]) for v in rows] for j, rows in by_judge.items()}
        refusals = refused["rule"]
        result: dict[str, Any] = {
            "n": len(benign),
            "refusal_rate": rate_summary(refusals, seed=_seed(cfg, "benign", "refusal"), **kw),
            "refusal_rate_by_judge": {
                j: rate_summary(v, seed=_seed(cfg, "benign", "refusal", j), **kw)
                for j, v in refused.items() if j != "rule"},
            "agreement": judge_agreement(refused),
            "diversity": response_diversity(responses),
        }
        columns = {"prompt": prompts, "response": responses,
                   "reference": [r["response"] for r in benign], "refusal": refusals}
        columns.update({f"{j}_refusal": v for j, v in refused.items() if j != "rule"})
        if nll:
            columns["nll"] = nll
            result["response_nll"] = mean_summary(nll, seed=_seed(cfg, "benign", "nll"), **kw)
        _write_parquet(out_dir / "benign.parquet", columns)
        helpfulness["benign"] = result
    timing["judge_and_score"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - clock

    metrics = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "adapter_dir": None if adapter_dir is None else str(adapter_dir),
        "model": cfg.model.name,
        "template": cfg.data.template,
        "seed": cfg.seed,
        "generation": {"engine": cfg.generation.engine, "max_new_tokens":
                       cfg.generation.max_new_tokens, "temperature": cfg.generation.temperature,
                       "top_p": cfg.generation.top_p},
        "judges": list(ev.judges),
        "bootstrap_samples": ev.bootstrap_samples,
        "confidence": ev.confidence,
        "safety": safety,
        "helpfulness": helpfulness,
        "responses_reused": reused,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
    }
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    return metrics


def _start_model_work(cfg: RunConfig, judges: list[str],
                      batches: dict[str, tuple[list[str], list[str]]], adapter_dir: Path | None,
                      nll_pairs: list[tuple[str, str]],
                      refusal_batches: dict[str, tuple[list[str], list[str]]],
                      ) -> Callable[[], ModelWork]:
    """Start an evaluation's model work (model judges, then the response NLL) in the background;
    the returned function waits for ``(verdicts, nll)``.

    Where the run's resident generation actor holds the one model all of it reads (the
    evaluated model's base, and the probe judge's feature model when that is the same config; no
    GPU), the work runs there (:func:`_model_work_on`), on the copy already loaded for
    generation. Otherwise one Ray task imports torch and loads the models itself
    (:func:`_model_work`). The numbers are the same either way: the NLL's adapter merge is the
    one a fresh load does, the probe reads the same weights, and both paths run at
    ``generation.torch_threads`` (the CPU kernels give the same bits at 1 and 2 threads here, but
    nothing promises that in general).
    """
    import ray

    from ray_fedit.evaluation.judging import reads_loaded_model
    from ray_fedit.generation import resident

    ev = cfg.evaluation
    adapter = None if adapter_dir is None else str(adapter_dir)
    gpus = max(ev.judge_num_gpus if judges else 0.0,
               cfg.generation.gpus_per_actor if nll_pairs else 0.0)
    if gpus == 0 and resident.serves(cfg.generation) and reads_loaded_model(judges, cfg,
                                                                             cfg.model):
        return resident.submit(cfg.model, cfg.generation.torch_threads, _model_work_on, cfg,
                               judges, batches, adapter, nll_pairs, refusal_batches)
    ref = ray.remote(_model_work).options(num_cpus=1, num_gpus=gpus).remote(
        cfg, judges, batches, adapter, nll_pairs, refusal_batches)
    return lambda: ray.get(ref)


def _model_work_on(model: Any, tok: Any, cfg: RunConfig, judges: list[str],
                   batches: dict[str, tuple[list[str], list[str]]], adapter_dir: str | None,
                   nll_pairs: list[tuple[str, str]],
                   refusal_batches: dict[str, tuple[list[str], list[str]]]) -> ModelWork:
    """:func:`_model_work` on a loaded base model (in the resident generation actor): the judges
    read it as it is, the NLL reads it with the adapter merged for the call."""
    from ray_fedit.evaluation.helpfulness import model_nll
    from ray_fedit.evaluation.judging import run_judges
    from ray_fedit.generation.hf import adapter_merged

    verdicts = run_judges(judges, cfg, batches, refusal_batches, loaded=(model, tok))
    nll: list[float | None] = []
    if nll_pairs:
        with adapter_merged(model, adapter_dir) as merged:
            nll = model_nll(merged, tok, nll_pairs, template=cfg.data.template,
                            max_seq_len=cfg.data.max_seq_len, batch_size=cfg.generation.batch_size)
    return verdicts, nll


def _model_work(cfg: RunConfig, judges: list[str],
                batches: dict[str, tuple[list[str], list[str]]], adapter_dir: str | None,
                nll_pairs: list[tuple[str, str]],
                refusal_batches: dict[str, tuple[list[str], list[str]]],
                ) -> ModelWork:
    """The Ray task of an evaluation: model judges on every benchmark, then the response NLL.

    One task, so a worker imports torch and transformers once; the judges load and release their
    weights one after the other, then the evaluated model loads for the NLL.
    """
    import torch

    from ray_fedit.evaluation.helpfulness import response_nll
    from ray_fedit.evaluation.judging import run_judges

    torch.set_num_threads(cfg.generation.torch_threads)  # as on the resident actor
    verdicts = run_judges(judges, cfg, batches, refusal_batches)
    nll = response_nll(cfg.model, adapter_dir, nll_pairs, template=cfg.data.template,
                       max_seq_len=cfg.data.max_seq_len, batch_size=cfg.generation.batch_size,
                       torch_threads=cfg.generation.torch_threads) if nll_pairs else []
    return verdicts, nll


def _mt_bench(cfg: RunConfig, questions: list[dict[str, Any]], answers: list[str],
              out_dir: Path) -> dict[str, Any]:
    """MT-1: grade first-turn answers 1-10 at ``evaluation.llm_judge``; write mt_bench.parquet.

    Returns:
        A mean block (``mean`` is MT-1) with ``per_category``.
    """
    from ray_fedit.judges.llm_http import chat_completions
    from ray_fedit.judges.mt_bench import judge_messages, rating_row

    ev = cfg.evaluation
    assert ev.llm_judge is not None  # EvaluationConfig enforces it when mt_bench is set
    convs = [judge_messages(q["instruction"], a, q["category"], q["reference"])
             for q, a in zip(questions, answers, strict=True)]
    rows = [rating_row(r) for r in chat_completions(convs, ev.llm_judge, temperature=0.0,
                                                    max_tokens=2048)]
    scores = [r["score"] for r in rows]
    _write_parquet(out_dir / "mt_bench.parquet", {
        "question_id": [str(q["question_id"]) for q in questions],
        "category": [q["category"] for q in questions],
        "prompt": [q["instruction"] for q in questions], "response": answers,
        "score": scores, "judge_raw": [r["raw"] for r in rows]})
    seed = _seed(cfg, "mt_bench")
    kw = {"samples": ev.bootstrap_samples, "confidence": ev.confidence}
    result = mean_summary(scores, seed=seed, **kw)
    result["per_category"] = by_category(scores, [q["category"] for q in questions], mean_summary,
                                         seed=seed, **kw)
    return result


class RoundEvaluator:
    """Evaluation every N rounds, for the federation driver to call after each round.

    Calls with ``round_index % every != 0`` (or ``every == 0``) do nothing and return None; other
    calls evaluate the adapter into ``eval_root / f"round_{round_index:04d}"`` (the stage name),
    the layout of ``checkpoints/round_0010``. The adapter is a PEFT directory or an adapter state
    dict (PEFT keys), which is saved to a temporary directory first.

    Args:
        cfg: the run config; ``every`` defaults to ``cfg.federation.eval_every``.
        eval_root: the run's ``eval/`` directory (``RunDir.root / "eval"``).
        benign_records: passed to every :func:`evaluate_adapter` call.
        every: override of the period.
        evaluate: the evaluation function (tests inject a fake; default :func:`evaluate_adapter`).
    """

    def __init__(self, cfg: RunConfig, eval_root: Path, *,
                 benign_records: list[Record] | None = None, every: int | None = None,
                 evaluate: Callable[..., dict[str, Any]] | None = None) -> None:
        self.cfg = cfg
        self.eval_root = Path(eval_root)
        self.benign_records = benign_records
        self.every = cfg.federation.eval_every if every is None else every
        self.evaluate = evaluate or evaluate_adapter

    def due(self, round_index: int) -> bool:
        """Whether round ``round_index`` (1-based: rounds completed) is evaluated."""
        return self.every > 0 and round_index > 0 and round_index % self.every == 0

    def __call__(self, round_index: int,
                 adapter: Path | str | dict[str, Any]) -> dict[str, Any] | None:
        """Evaluate after round ``round_index`` if due; return the metrics or None."""
        if not self.due(round_index):
            return None
        stage = f"round_{round_index:04d}"
        if isinstance(adapter, dict):
            import tempfile

            from ray_fedit.models.lora import save_adapter

            with tempfile.TemporaryDirectory(prefix="ray_fedit_eval_") as tmp:
                path = save_adapter(adapter, self.cfg.lora, tmp, base_model=self.cfg.model.name)
                return self.evaluate(self.cfg, stage=stage, adapter_dir=path,
                                     out_dir=self.eval_root / stage,
                                     benign_records=self.benign_records)
        return self.evaluate(self.cfg, stage=stage, adapter_dir=Path(adapter),
                             out_dir=self.eval_root / stage, benign_records=self.benign_records)
