"""The typed config tree of one run, loaded from YAML plus dotted command-line overrides.

Every section is a pydantic model with ``extra="forbid"``: a misspelled key is an error, never a silent
default. Cross-field rules (``clients_per_round <= num_clients``, Krum/Bulyan's client counts, ...) are
checked at load, before Ray starts, and every error names the field path, the bad value, the rule and a
fix. Values that can be derived (malicious client count, the attacker count ``f: expected``) are
computed here and written into the resolved config, never repeated by hand.

Example:
    >>> cfg = load_config("configs/quickstart.yaml", ["federation.rounds=2", "aggregator.name=krum"])
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ray_fedit.errors import ConfigError

BUNDLED_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
# numpy's default_rng rejects negative seeds, and derive_seed keeps only a seed's low 64 bits.
Seed = Annotated[int, Field(ge=0, lt=2**64)]


# ----------------------------------------------------------------------------------------- model
class TinyModelConfig(Section):
    """Architecture of the tiny random Llama used for mechanics tests (``model.name: tiny-random-llama``)."""

    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 128
    seed: Seed = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}, "
                f"and num_heads by num_kv_heads={self.num_kv_heads}"
            )
        return self


class ModelConfig(Section):
    """The base LLM. ``name`` is the bundled offline model, the tiny test model, a hub id or a directory."""

    name: str = Field(BUNDLED_MODEL, description=f"{BUNDLED_MODEL!r} (offline, bundled), "
                      f"{TINY_MODEL!r}, a Hugging Face hub id, or a local HF model directory")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    gradient_checkpointing: bool = False
    tiny: TinyModelConfig = TinyModelConfig()


class LoraConfig(Section):
    """LoRA adapter shape (paper: r=32, alpha=64, dropout 0.05 on q_proj, v_proj)."""

    r: PositiveInt = 8
    alpha: PositiveInt = Field(16, description="scaling = alpha / r; usually alpha = 2 * r")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


# ------------------------------------------------------------------------------------------ data
class DataSourceConfig(Section):
    """One source of records.

    ``kind``: ``jsonl | csv | parquet`` (``path`` is a file), ``hub`` (``path`` is a dataset id for
    ``datasets.load_dataset``), ``package`` (``path`` is a dataset that ships in a package: the
    prompt benchmarks ``advbench``, ``harmbench``, ``donotanswer``, ``strongreject``, and the
    human-labelled pairs ``pyrit_safe_responses`` and ``pyrit_helpful_responses``), or ``generated``
    (``path`` names a generation pipeline: ``benign``, ``attack``, ``aligned``).
    """

    kind: Literal["jsonl", "csv", "parquet", "hub", "package", "generated"]
    path: str
    subset: str | None = Field(None, description="hub dataset config name")
    split: str = "train"
    instruction_field: str = "instruction"
    response_field: str | None = Field("response", description="None for prompt-only data")
    source: str | None = Field(None, description="label stored in each record; default: path")
    is_harmful: bool = False
    limit: PositiveInt | None = None
    preset: Literal["plain", "chat_first_turn", "beavertails_unsafe"] = Field(
        "plain", description="row preprocessing: plain = the two fields; chat_first_turn = LMSYS-Chat/"
        "WildChat as in the paper (first turn, English, no moderation flag); beavertails_unsafe = "
        "is_safe false, duplicate prompts dropped")


class DataConfig(Section):
    """Benign client data, prompt formatting and partitioning."""

    benign: list[DataSourceConfig] = Field(
        default_factory=lambda: [DataSourceConfig(kind="generated", path="benign")],
        description="normal (instruction -> helpful response) data for benign clients",
    )
    aligned: list[DataSourceConfig] = Field(
        default_factory=lambda: [DataSourceConfig(kind="generated", path="aligned")],
        description="aligned (harmful instruction -> refusal) data mixed into benign clients",
    )
    aligned_fraction: Fraction = Field(0.2, description="share of aligned pairs in a benign client")
    template: Literal["chat", "alpaca"] = Field("chat", description="the model's chat template, "
                                                "or the paper's Alpaca template")
    max_seq_len: PositiveInt = 256
    samples_per_client: PositiveInt = 64
    partition: Literal["iid", "dirichlet", "by_source"] = "iid"
    dirichlet_alpha: Annotated[float, Field(gt=0.0)] = 0.5
    on_bad_row: Literal["raise", "skip"] = Field("raise", description="skip: drop and count "
                                                 "malformed rows instead of stopping")


# ------------------------------------------------------------------------------ threat + defense
class UpdateAttackConfig(Section):
    """An optional update-space attack applied to malicious deltas before aggregation."""

    name: str = Field("none", description="'none' or a registered update attack (sign_flip, alie, ...)")
    params: dict[str, Any] = Field(default_factory=dict)
    on_too_few_references: Literal["send_trained", "raise"] = Field(
        "send_trained", description="a round with fewer reference updates than the attack needs "
        "(ALIE, IPM, min-max, min-sum under uniform sampling): send_trained = the malicious clients "
        "send the update they trained on their poisoned data unchanged (logged per round in "
        "rounds.jsonl); raise = stop the run")


class AttackConfig(Section):
    """The safety attack: malicious clients train on unaligned (harmful -> harmful) data."""

    malicious_fraction: Fraction = 0.3
    data: DataSourceConfig = Field(
        default_factory=lambda: DataSourceConfig(kind="generated", path="attack", is_harmful=True),
        description="unaligned data of malicious clients: generated = the paper's MaliciousGen "
        "(questions and answers generated); a prompt-only source (a packaged benchmark, or "
        "response_field: null) = its questions answered by the attack pipeline; a source with "
        "responses = used as it is",
    )
    filter_refusals: bool = Field(True, description="drop generated pairs whose response the rule "
                                  "judge calls a refusal")
    update: UpdateAttackConfig = UpdateAttackConfig()
    compare_no_attack: bool = Field(False, description="also run the same federation without "
                                    "attackers (the paper's 'FedAvg (No Attack)' reference row)")


class AggregatorConfig(Section):
    """The server's aggregation rule. ``f`` is the attacker count a robust rule assumes."""

    name: str = "mean"
    f: int | Literal["expected"] | None = Field(
        None, description="assumed attackers per round: an int, or 'expected' = round(clients_per_round"
        " x malicious_fraction), the paper's oracle; required by rules that take f",
    )
    params: dict[str, Any] = Field(default_factory=dict)
    num_shards: PositiveInt = Field(1, description="coordinate shards aggregated as parallel Ray "
                                    "tasks (same result bitwise); 1 = in the driver process. Only "
                                    "rules with a column plan: median, trimmed_mean, bulyan (its "
                                    "coordinate-wise step), residual")
    cpus_per_shard: Annotated[float, Field(gt=0.0)] = Field(1.0, description="CPUs each shard task "
                                                            "reserves; its threads = max(1, floor)")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where in-process aggregation "
                                                   "runs; auto = cuda if torch.cuda.is_available() "
                                                   "and the rule has a column plan, else cpu. cuda "
                                                   "needs num_shards=1")

    @model_validator(mode="after")
    def _placement_fits_rule(self) -> AggregatorConfig:
        if self.num_shards == 1 and self.device != "cuda":
            return self
        # Imported here: the registry imports the (Ray-free) rule modules on first use.
        from ray_fedit.aggregators.base import column_plan
        from ray_fedit.registry import AGGREGATORS, RegistryError

        try:
            plan = column_plan(self.name)
        except RegistryError:
            return self  # RunConfig reports the unknown name
        what = f"num_shards={self.num_shards}" if self.num_shards > 1 else "device=cuda"
        if plan is None:
            splits = [r for r in AGGREGATORS.names() if column_plan(r) is not None]
            raise ValueError(f"{what} needs a rule that splits by coordinates ({', '.join(splits)}"
                             f"); {self.name!r} does not. Fix: set num_shards=1 and device=cpu "
                             "(or auto)")
        if self.num_shards > 1 and self.device == "cuda":
            raise ValueError("num_shards > 1 runs the shards on CPU Ray tasks and device=cuda runs "
                             "in the driver process; choose one")
        return self


class DefenseConfig(Section):
    """The post-hoc defense: fine-tune the final global adapter on defense data (paper Sec. 5)."""

    name: str = Field("posthoc", description="'none', 'posthoc' (after FedIT) or 'pretrained' "
                      "(defense data on the base model alone, paper Fig. 7)")
    level: Literal[1, 2, 3] = Field(3, description="1: public dataset, 2: external generator model, "
                                    "3: the attacked global model itself")
    public: list[DataSourceConfig] = Field(default_factory=list, description="level-1 sources: "
                                           "rows to harmful requests give the aligned part, the "
                                           "others the normal part")
    generator_model: str | None = Field(None, description="level-2 generator (hub id, directory or "
                                        "bundled name); default: the base model")
    num_samples: PositiveInt = 1000
    aligned_ratio: Fraction = 0.5
    steps: PositiveInt = 500
    steps_per_round: PositiveInt = Field(10, description="the paper runs the defense as 50 FL rounds "
                                         "of 10 steps: lr is constant within a round (cosine across "
                                         "rounds) and AdamW restarts each round")
    batch_size: PositiveInt = Field(16, description="global batch, split over num_workers")
    lr: Annotated[float, Field(gt=0.0)] = 5e-5
    lr_min: Annotated[float, Field(ge=0.0)] = 1e-6
    max_grad_norm: Annotated[float, Field(gt=0.0)] | None = 1.0
    checkpoint_every: PositiveInt = Field(100, description="save the adapter every N steps (the "
                                          "paper's steps ablation)")
    evaluate_checkpoints: bool = Field(False, description="also evaluate every saved step "
                                       "(the steps ablation, paper Fig. 6)")
    num_workers: PositiveInt = Field(1, description="Ray Train workers (data parallel)")
    use_gpu: bool = False
    deepspeed: str | None = Field(None, description="path to a DeepSpeed JSON config, relative "
                                  "to the working directory (configs/deepspeed/); checked at "
                                  "load; default: plain DDP")

    @model_validator(mode="after")
    def _batch_splits(self) -> DefenseConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by "
                             f"num_workers={self.num_workers} (each worker takes an equal share)")
        if self.checkpoint_every % self.steps_per_round:
            raise ValueError(f"checkpoint_every={self.checkpoint_every} must be a multiple of "
                             f"steps_per_round={self.steps_per_round} (adapters are saved at round "
                             f"ends); use {self.steps_per_round}, {2 * self.steps_per_round}, ...")
        return self


# ------------------------------------------------------------------------------------ federation
# Server step sizes when federation.server_lr is not set: FedAvg and OpenFedLLM's FedAvgM step by
# the (momentum of the) aggregate itself; the adaptive optimizers use OpenFedLLM's fedopt_eta.
DEFAULT_SERVER_LR = {"none": 1.0, "fedavgm": 1.0, "fedadagrad": 1e-3, "fedadam": 1e-3,
                     "fedyogi": 1e-3}


class FederationConfig(Section):
    """Rounds, clients and local training (paper: 10 clients, 3 per round, 100 rounds, 10 steps)."""

    num_clients: PositiveInt = 10
    clients_per_round: PositiveInt = 3
    rounds: PositiveInt = 5
    local_steps: PositiveInt = 5
    batch_size: PositiveInt = 4
    grad_accum: PositiveInt = 1
    lr: Annotated[float, Field(gt=0.0)] = Field(1e-3, description="round-0 learning rate; cosine "
                                                "decay per round to lr_min (paper: 5e-5 -> 1e-6)")
    lr_min: Annotated[float, Field(ge=0.0)] = 1e-6
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0.0)] | None = 1.0
    algorithm: Literal["fedavg", "fedprox", "scaffold"] = "fedavg"
    prox_mu: Annotated[float, Field(ge=0.0)] = 0.01
    server_optimizer: Literal["none", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] = "none"
    server_lr: Annotated[float, Field(gt=0.0)] | None = Field(
        None, description="server step size; default per optimizer: 1.0 for none and fedavgm "
        "(FedAvg, and OpenFedLLM's FedAvgM), 1e-3 for fedadagrad, fedadam and fedyogi "
        "(OpenFedLLM's fedopt_eta; an adaptive step of 1.0 is ~1000x a FedAvg step)")
    server_momentum: Fraction = 0.9
    server_beta1: Fraction = 0.9
    server_beta2: Fraction = 0.99
    server_tau: Annotated[float, Field(gt=0.0)] = 1e-3
    sampling: Literal["uniform", "stratified"] = Field(
        "uniform", description="stratified keeps the malicious share of each round's sample at "
        "the configured fraction (useful in short demos)")
    compat: Literal["none", "openfedllm"] = Field(
        "none", description="openfedllm: the paper code's random.seed(round) sampling, per-round "
        "subsample of batch*steps examples, dataset-size weights")
    on_client_failure: Literal["retry", "drop", "raise"] = "retry"
    max_task_retries: Annotated[int, Field(ge=0)] = 2
    min_quorum: PositiveInt | None = Field(None, description="fewest updates a round may aggregate;"
                                           " default clients_per_round")
    round_timeout_s: Annotated[float, Field(gt=0.0)] | None = None
    worker_recovery_s: Annotated[float, Field(gt=0.0)] = Field(
        300.0, description="how long a retry waits for a trainer worker that died to restart (or "
        "for its replacement, once resources.max_restarts are used up) to load the model again")
    checkpoint_every: Annotated[int, Field(ge=0)] = 1
    eval_every: Annotated[int, Field(ge=0)] = Field(0, description="evaluate the global adapter "
                                                    "every N rounds (0: only after the stage)")

    @property
    def resolved_server_lr(self) -> float:
        """``server_lr``, or the optimizer's default when it is not set."""
        if self.server_lr is not None:
            return self.server_lr
        return DEFAULT_SERVER_LR[self.server_optimizer]


# ----------------------------------------------------------------------------- generation + eval
class HttpEngineConfig(Section):
    """An OpenAI-compatible chat endpoint. The key is read from ``api_key_env`` and never written."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: PositiveInt = 4
    max_retries: Annotated[int, Field(ge=0)] = 5
    timeout_s: Annotated[float, Field(gt=0.0)] = 60.0
    backoff_s: Annotated[float, Field(gt=0.0)] = Field(0.5, description="first retry delay; doubles "
                                                       "per retry (429, 5xx, connection errors)")


class GenerationConfig(Section):
    """The inference engine used to generate data and evaluation responses."""

    engine: Literal["hf", "vllm", "http"] = "hf"
    batch_size: PositiveInt = 16
    max_new_tokens: PositiveInt = 64
    temperature: Annotated[float, Field(ge=0.0)] = Field(0.0, description="0 = greedy")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    num_actors: PositiveInt = 1
    http: HttpEngineConfig = HttpEngineConfig()
    num_benign: PositiveInt = Field(200, description="benign pairs generated from seed instructions")
    num_attack: PositiveInt = Field(200, description="unaligned pairs generated (MaliciousGen)")
    num_aligned: PositiveInt = Field(100, description="aligned (refusal) pairs generated")
    generator_model: str | None = Field(None, description="model that writes attack, benign and "
                                        "aligned data (like model.name); default: model.name")
    data_seed: Seed | None = Field(None, description="seed of generated data; default: the run seed")
    torch_threads: PositiveInt = Field(2, description="torch threads per hf actor (size to cores)")
    gpus_per_actor: Annotated[float, Field(ge=0.0)] = Field(0.0, description="GPUs per hf actor; "
                                                            "the actor uses CUDA when it gets one")
    instruction_temperature: Annotated[float, Field(gt=0.0)] = Field(
        1.0, description="sampling temperature when a model writes lists of instructions (greedy "
        "would repeat the same list for every seed)")
    instruction_max_new_tokens: PositiveInt = Field(384, description="room for a list of 10")
    max_rounds: PositiveInt = Field(20, description="most rounds of instruction generation or "
                                    "answering before a pipeline stops short (with a warning)")
    oversample: Annotated[float, Field(ge=1.0)] = Field(1.5, description="answer this many times "
                                                        "the rows still needed (filters drop some)")
    near_dup_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.7, description="character 4-gram Jaccard at or above which two instructions are duplicates")
    harmful_sources: list[DataSourceConfig] = Field(
        default_factory=lambda: [
            DataSourceConfig(kind="package", path="harmbench", is_harmful=True),
            DataSourceConfig(kind="package", path="donotanswer", is_harmful=True),
        ],
        description="harmful prompts answered with the safety reminder for aligned pairs; keep them "
        "disjoint from the evaluation benchmarks (AdvBench)")
    defense_instructions: Literal["generated", "sources"] = Field(
        "generated", description="level-2/3 defense instructions: 'generated' = the paper's "
        "malicious-user and curious-user prompts; 'sources' = harmful_sources + seed instructions")
    refusal_match: Literal["substring", "word"] = Field(
        "word", description="refusal filters on generated data: 'substring' = the paper's rule "
        "(anywhere, so 'as an' matches 'has an'); 'word' = keywords at word boundaries")
    refusal_fallback: bool = Field(False, description="fill missing aligned pairs with templated "
                                   "refusals (recorded in provenance); off: warn and keep fewer")


class BenchmarkConfig(Section):
    """A safety benchmark: a package-shipped name or any data source."""

    name: Literal["advbench", "harmbench", "strongreject", "donotanswer", "custom"] = "advbench"
    source: DataSourceConfig | None = Field(None, description="for name=custom")
    num_prompts: PositiveInt | None = 64
    seed: Seed | None = Field(None, description="seed of the prompt subset; default: the run seed")
    stratify: bool = Field(True, description="keep each category's share in the subset")
    append_period: bool = Field(False, description="append '.' to instructions without final "
                                "punctuation (the paper does this to AdvBench)")

    @model_validator(mode="after")
    def _custom_needs_source(self) -> BenchmarkConfig:
        if (self.name == "custom") != (self.source is not None):
            raise ValueError("name=custom needs a source (and only custom takes one); set "
                             "source: {kind: jsonl, path: ..., instruction_field: ...}")
        return self


class EvaluationConfig(Section):
    """Safety and helpfulness evaluation of the global adapter."""

    benchmarks: list[BenchmarkConfig] = Field(default_factory=lambda: [BenchmarkConfig()])
    judges: list[str] = Field(default_factory=lambda: ["rule"], min_length=1)
    judge_model: str | None = Field(None, description="MD-Judge / Llama Guard model for judge_model")
    judge_format: Literal["md_judge", "llama_guard"] = "md_judge"
    probe_model: str = Field(BUNDLED_MODEL, description="feature model of the probe judge (a "
                             "refusal classifier fit on human labels; docs/evaluation.md)")
    reward_model: str = "OpenAssistant/reward-model-deberta-v3-large-v2"
    include_base: bool = Field(False, description="also evaluate the base model without any "
                               "adapter (a reference row)")
    num_benign_prompts: Annotated[int, Field(ge=0)] = Field(32, description="held-out benign prompts "
                                                            "for over-refusal and response NLL")
    bootstrap_samples: PositiveInt = 1000
    confidence: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95
    judge_engine: Literal["hf", "http"] = Field("hf", description="runs judge_model: hf = a Ray "
                                                "task; http = judge_http's /completions (vLLM)")
    judge_http: HttpEngineConfig = Field(default_factory=HttpEngineConfig, description="endpoint "
                                         "of judge_model when judge_engine=http")
    judge_max_new_tokens: PositiveInt = Field(32, description="room for a verdict and category")
    judge_batch_size: PositiveInt = Field(8, description="pairs per batch of judge and reward "
                                          "models")
    judge_num_gpus: Annotated[float, Field(ge=0.0)] = Field(0.0, description="GPUs of the judge "
                                                            "and reward-model workers")
    llm_judge: HttpEngineConfig | None = Field(None, description="OpenAI-compatible endpoint of a "
                                               "GPT-4-class judge (llm_judge_http and MT-1)")
    mt_bench: DataSourceConfig | None = Field(None, description="MT-Bench questions (jsonl or hub, "
                                              "instruction_field: turns); MT-1 needs llm_judge")
    benign: DataSourceConfig | None = Field(None, description="held-out benign (instruction, "
                                            "response) pairs, when the caller passes none")

    @model_validator(mode="after")
    def _judges_have_what_they_need(self) -> EvaluationConfig:
        if "judge_model" in self.judges and self.judge_model is None:
            raise ValueError("judge 'judge_model' needs evaluation.judge_model (e.g. "
                             "OpenSafetyLab/MD-Judge-v0.1 with judge_format=md_judge)")
        if ("llm_judge_http" in self.judges or self.mt_bench is not None) and not self.llm_judge:
            raise ValueError("llm_judge_http and mt_bench need evaluation.llm_judge "
                             "(base_url, model, api_key_env of an OpenAI-compatible endpoint)")
        return self


# ------------------------------------------------------------------------------------ resources
class ResourcesConfig(Section):
    """What the trainer workers ask Ray for. The driver asks for CPU only."""

    num_workers: PositiveInt = 1
    cpus_per_worker: Annotated[float, Field(gt=0.0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0.0)] = 0.0
    torch_threads: PositiveInt = 2
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_restarts: Annotated[int, Field(ge=0)] = 2


class OutputConfig(Section):
    """Where runs go: ``<root>/<name>/<timestamp>/``."""

    root: str = Field("runs", description="directory of all runs, relative to the working "
                      "directory; '.' is the working directory itself")
    name: str = Field("run", description="one directory name under root (no '/'; nest runs with "
                      "root: runs/study)")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers that get the config, per-round "
        "metrics, evaluations, defense loss and the report (offline, under RUN_DIR/tracking; "
        "docs/tracking.md); each needs its extra: pip install 'ray-fedit[mlflow]'")

    @field_validator("trackers")
    @classmethod
    def _trackers_once(cls, trackers: list[str]) -> list[str]:
        if len(set(trackers)) != len(trackers):
            raise ValueError(f"lists a tracker twice: {trackers}; fix: name each once")
        return trackers

    @field_validator("root")
    @classmethod
    def _root_names_a_directory(cls, root: str) -> str:
        if not root.strip():
            raise ValueError("must name a directory; use '.' for the working directory")
        return root

    @field_validator("name")
    @classmethod
    def _name_is_one_directory(cls, name: str) -> str:
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError("must be one directory name (not empty, '.' or '..', no '/' or "
                             "'\\'); fix: nest runs with output.root, e.g. root: runs/study")
        return name


class RunConfig(Section):
    """One run: FedIT under attack, evaluation, post-hoc defense, evaluation, report."""

    seed: Seed = Field(0, description="run seed, in [0, 2**64): every random draw derives from it")
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    attack: AttackConfig = AttackConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    defense: DefenseConfig = DefenseConfig()
    generation: GenerationConfig = GenerationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    resources: ResourcesConfig = ResourcesConfig()
    output: OutputConfig = OutputConfig()

    # ---- derived values (computed, never configured) ----
    @property
    def num_malicious(self) -> int:
        """Malicious clients: round half up of num_clients x malicious_fraction."""
        return _round_half_up(self.federation.num_clients * self.attack.malicious_fraction)

    @property
    def assumed_attackers(self) -> int | None:
        """The ``f`` handed to robust rules: explicit, or the paper's oracle when 'expected'."""
        f = self.aggregator.f
        if f == "expected":
            return _round_half_up(self.federation.clients_per_round * self.attack.malicious_fraction)
        return f

    def aggregator_params(self) -> dict[str, Any]:
        """Keyword arguments of the aggregation rule, with ``f`` resolved for rules that take it.

        A rule without an attacker count (``mean``, ``median``, ...) is not given ``f``, so one
        sweep can set ``aggregator.f: expected`` across robust and plain rules.
        """
        import inspect

        from ray_fedit.registry import AGGREGATORS

        params = dict(self.aggregator.params)
        takes_f = "f" in inspect.signature(AGGREGATORS.get(self.aggregator.name)).parameters
        if self.assumed_attackers is not None and takes_f:
            params["f"] = self.assumed_attackers
        return params

    @model_validator(mode="after")
    def _cross_field_rules(self, info: ValidationInfo) -> RunConfig:
        # Every rule runs, so one load reports all of them (one "@path: ..." line each). Files the
        # config names are read only by load_config (context read_files): Ray workers validate
        # the config again in their own working directories.
        read_files = bool(info.context and info.context.get("read_files"))
        problems = [*_federation_problems(self.federation),
                    *_defense_problems(self.defense, read_files)]
        try:
            self._check_components()
        except ValueError as e:
            problems.append(str(e))
        problems += [*_aggregator_f_problems(self), *_min_quorum_problems(self)]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _check_components(self) -> None:
        """Names must be registered, and robust rules must be possible with this many clients."""
        # Imported here: the registries import their (Ray-free) component packages on first use.
        from ray_fedit.aggregators import check_params
        from ray_fedit.errors import AggregationError
        from ray_fedit.registry import AGGREGATORS, ATTACKS, DEFENSES, JUDGES, RegistryError

        def known(path: str, registry: Any, name: str) -> None:
            try:
                registry.get(name)
            except RegistryError as e:
                raise ValueError(f"@{path}: {e}") from None

        known("aggregator.name", AGGREGATORS, self.aggregator.name)
        if self.attack.update.name != "none":
            known("attack.update.name", ATTACKS, self.attack.update.name)
            self._check_update_attack()
        if self.defense.name != "none":
            known("defense.name", DEFENSES, self.defense.name)
        for i, judge in enumerate(self.evaluation.judges):
            known(f"evaluation.judges.{i}", JUDGES, judge)
        try:
            check_params(self.aggregator.name, self.federation.clients_per_round,
                         self.aggregator_params())
        except AggregationError as e:
            raise ValueError(f"@aggregator: {e}; fix: change aggregator.f/params or "
                             "federation.clients_per_round") from None

    def _check_update_attack(self) -> None:
        """Known parameters, and a sampling under which the attack can find its references."""
        from ray_fedit.attacks import check_update_attack_feasible, check_update_attack_params
        from ray_fedit.federation.sampling import malicious_per_round

        upd, fed = self.attack.update, self.federation
        mode = "openfedllm" if fed.compat == "openfedllm" else fed.sampling
        try:
            check_update_attack_params(upd.name, upd.params)
            check_update_attack_feasible(
                upd.name, upd.params, clients_per_round=fed.clients_per_round,
                malicious_per_round=malicious_per_round(mode, fed.num_clients,
                                                        fed.clients_per_round, self.num_malicious))
        except ConfigError as e:
            raise ValueError(f"@attack.update: {e}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _problem(path: str, value: Any, rule: str, fix: str) -> str:
    """A cross-field problem, ``@path: value rule; fix: ...``, as ``_format_errors`` reads it.

    ``path`` may list related fields after the reported one (``a.b,c.d``): the problem is then
    located at whichever of them an override or the file sets.
    """
    return f"@{path}: {value!r} {rule}; fix: {fix}"


def _federation_problems(fed: FederationConfig) -> list[str]:
    problems = []
    if fed.clients_per_round > fed.num_clients:
        problems.append(_problem("federation.clients_per_round", fed.clients_per_round,
                                 f"must be <= federation.num_clients ({fed.num_clients})",
                                 "lower clients_per_round or raise num_clients"))
    if fed.min_quorum is not None and fed.min_quorum > fed.clients_per_round:
        problems.append(_problem("federation.min_quorum", fed.min_quorum,
                                 f"must be <= clients_per_round ({fed.clients_per_round})",
                                 "lower min_quorum"))
    # Also checked by federation.driver.check_clients, for configs built without load_config.
    if fed.compat == "openfedllm" and fed.sampling == "stratified":
        problems.append(_problem(
            "federation.compat,federation.sampling", fed.compat, "samples clients like the "
            "paper's code (random.seed(round)) and cannot also keep each round's malicious share "
            "(sampling=stratified)", "set federation.sampling=uniform or federation.compat=none"))
    return problems


def _defense_problems(d: DefenseConfig, read_files: bool) -> list[str]:
    if d.name == "none":  # no defense stage: nothing in the section is used
        return []
    problems = []
    if d.level == 1 and not d.public:
        problems.append(_problem(
            "defense.level,defense.public", d.level, "samples defense data from defense.public, "
            "which is empty", "add sources to defense.public (e.g. {kind: package, path: "
            "pyrit_safe_responses}) or use defense.level 2 or 3"))
    if d.deepspeed is not None and read_files:
        rule = _deepspeed_rule(d.deepspeed)
        if rule is not None:
            problems.append(_problem("defense.deepspeed", d.deepspeed, rule, "name a DeepSpeed "
                                     "JSON config (e.g. configs/deepspeed/zero2_offload.json), "
                                     "or remove the key for plain DDP"))
    return problems


def _deepspeed_rule(path: str) -> str | None:
    """Why the DeepSpeed JSON at ``path`` cannot be used, or None.

    Read as the defense trainer reads it (``defenses.posthoc``, in the driver): a relative path
    starts at the working directory.
    """
    if not path.strip():
        return "is empty"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        return (f"cannot be read ({e.strerror}; relative paths start at the working directory "
                f"{Path.cwd()})")
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"is not valid JSON (line {e.lineno}: {e.msg})"
    if not isinstance(data, dict):
        return "must hold a JSON object"
    return None


def _aggregator_f_problems(cfg: RunConfig) -> list[str]:
    """``aggregator.f`` must reach the rule: no explicit count for a rule without f, no second f."""
    from ray_fedit.aggregators import accepted_params
    from ray_fedit.registry import RegistryError

    agg = cfg.aggregator
    if agg.f is None:
        return []
    try:
        takes_f = "f" in accepted_params(agg.name)
    except RegistryError:  # reported by _check_components
        return []
    if not takes_f and agg.f != "expected":  # 'expected' spans robust and plain rules on purpose
        return [_problem("aggregator.f,aggregator.name", agg.f, "is an attacker count, but "
                         f"aggregator {agg.name!r} takes no f", "remove aggregator.f, or write "
                         "f: expected (given only to rules that take f)")]
    if takes_f and "f" in agg.params:
        return [_problem("aggregator.f,aggregator.params", agg.f,
                         f"and aggregator.params.f={agg.params['f']!r} both set f",
                         "keep only aggregator.f")]
    return []


def _min_quorum_problems(cfg: RunConfig) -> list[str]:
    """After failures a round aggregates as few as ``min_quorum`` updates: the rule must work."""
    from ray_fedit.aggregators import check_params
    from ray_fedit.errors import AggregationError
    from ray_fedit.registry import RegistryError

    fed, name = cfg.federation, cfg.aggregator.name
    if fed.min_quorum is None or fed.min_quorum >= fed.clients_per_round:
        return []

    def fails(n: int) -> AggregationError | None:
        try:
            check_params(name, n, params)
        except AggregationError as e:
            return e
        return None

    try:
        params = cfg.aggregator_params()
        if fails(fed.clients_per_round):  # reported by _check_components
            return []
    except RegistryError:
        return []
    error = fails(fed.min_quorum)
    if error is None:
        return []
    enough = next(n for n in range(fed.min_quorum + 1, fed.clients_per_round + 1) if not fails(n))
    return [_problem("federation.min_quorum,aggregator", fed.min_quorum, "is too few updates "
                     f"for aggregator {name!r} (a round that aggregates only min_quorum updates "
                     f"would fail: {error})", f"raise federation.min_quorum to {enough}, or "
                     "change aggregator.f/params")]


# ------------------------------------------------------------------------------------- loading
def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` (value parsed as YAML) or ``~a.b.c`` (delete) override in place.

    Raises:
        ConfigError: if the override is not of that form, or a ``--flag`` was passed.
    """
    if override.startswith("-"):
        raise ConfigError(f"override {override!r}: flags are not config overrides; "
                          "write key=value (e.g. federation.rounds=5)")
    delete = override.startswith("~")
    key, sep, raw = override.removeprefix("~").partition("=")
    if not key or (not delete and not sep) or (delete and sep):
        raise ConfigError(f"override {override!r} must be key=value or ~key "
                          "(e.g. aggregator.name=krum)")
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is a value, "
                              "not a section")
        node = child
    if delete:
        node.pop(parts[-1], None)
        return
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({e})") from None


KeyPath = tuple[str, ...]
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _yaml_lines(
    root: yaml.Node | None, loader: yaml.SafeLoader
) -> tuple[dict[KeyPath, int], list[tuple[KeyPath, int, int]]]:
    """Map each key path of a composed YAML document to its 1-based line, for error messages.

    Also returns the keys repeated within one mapping, as ``(path, line, first line)``: YAML
    would keep only the last value. Keys compare as ``loader`` constructs them (``1`` and ``0x1``
    are the same key); a key after a ``<<`` merge overrides the merged one and is no repeat.
    """
    lines: dict[KeyPath, int] = {}
    repeats: list[tuple[KeyPath, int, int]] = []
    reported: set[int] = set()  # an aliased mapping is walked once per path that reaches it
    on_path: set[int] = set()  # a recursive alias (a: &x [*x]) is not walked forever

    def walk(node: yaml.Node, path: KeyPath) -> None:
        if id(node) in on_path:
            return
        on_path.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for k, v in node.value:
                p, line = (*path, str(k.value)), k.start_mark.line + 1
                lines[p] = line
                if k.tag != _MERGE_TAG:
                    try:
                        key = loader.construct_object(k, deep=True)
                        if key in first and id(k) not in reported:
                            reported.add(id(k))
                            repeats.append((p, line, first[key]))
                        first.setdefault(key, line)
                    except TypeError:  # an unhashable key: construct_document reports it
                        pass
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[(*path, str(i))] = v.start_mark.line + 1
                walk(v, (*path, str(i)))
        on_path.discard(id(node))

    if root is not None:
        walk(root, ())
    return lines, repeats


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """The tree of a YAML config file, and the line of each key path in it.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 or not YAML, repeats a key (one line
            per repeat), or does not hold a mapping.
    """
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {source!r}: cannot read it ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 text (byte offset {e.start}: {e.reason}); "
                          "save the config as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        lines, repeats = _yaml_lines(root, loader)
        loaded = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if repeats:
        raise ConfigError("\n".join(
            f"{source}:{line}: {'.'.join(p)}: duplicate key (first at line {first}); YAML would "
            "keep only the last value; fix: remove one of them" for p, line, first in repeats))
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return loaded or {}, lines


def _format_errors(
    e: ValidationError,
    source: str,
    lines: dict[KeyPath, int],
    from_override: dict[KeyPath, str],
) -> str:
    def at(locs: list[KeyPath], cross_field: bool) -> str:
        """The override that set one of ``locs`` (or their section), else the file line."""
        prefixes = [loc[:i] for loc in locs for i in range(len(loc), 0, -1)]
        override = next((from_override[p] for p in prefixes if p in from_override), None)
        if override is None and cross_field:  # an override inside the section a rule checks
            override = next((ov for loc in locs for key, ov in from_override.items()
                             if key[: len(loc)] == loc), None)
        line = next((lines[p] for p in [*locs, *prefixes] if p in lines), None)
        if override is not None:
            return f"override {override!r}: "
        if line is not None:
            return f"{source}:{line}: "
        return f"{source}: " if source else ""

    msgs = []
    for err in e.errors():
        loc = tuple(str(p) for p in err["loc"])
        text = err["msg"].removeprefix("Value error, ")
        if text.startswith("@"):  # rules across fields: "@path[,related]: ..." lines (_problem)
            for problem in text[1:].split("\n@"):
                paths, _, rule = problem.partition(": ")
                where = paths.split(",")[0]
                msgs.append(f"{at([tuple(p.split('.')) for p in paths.split(',')], True)}"
                            f"{where}: {rule}")
            continue
        where = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _known_fields(loc[:-1])
            msgs.append(f"{at([loc], False)}{where}: unknown key; known keys here: {', '.join(known)}")
        elif text.startswith(f"{err.get('input')!r} "):
            msgs.append(f"{at([loc], False)}{where}: {text}")
        else:
            msgs.append(f"{at([loc], False)}{where}: {err.get('input')!r} is invalid: {text}")
    return "\n".join(msgs)


def _known_fields(path: tuple[str, ...]) -> list[str]:
    model: Any = RunConfig
    for part in path:
        if part.isdigit():
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)]
        model = next((a for a in [ann, *args] if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
        if model is None:
            return []
    return sorted(model.model_fields)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.

    Raises:
        ConfigError: with one line per problem, each naming file:line or the override, the field
            path, the bad value and the rule.
    """
    tree: dict[str, Any] = {}
    lines: dict[KeyPath, int] = {}
    source = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        source = str(p)
        tree, lines = _read_yaml(p)
    from_override: dict[KeyPath, str] = {}
    for ov in overrides:
        apply_override(tree, ov)
        from_override[tuple(ov.removeprefix("~").partition("=")[0].split("."))] = ov
    try:
        cfg = RunConfig.model_validate(tree, context={"read_files": True})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, lines, from_override)) from None
    return cfg
