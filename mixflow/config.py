"""The typed pipeline spec (``mixflow run pipelines/<name>.yaml``).

Every section is a strict pydantic model: unknown fields and wrong values are
rejected with a :class:`~mixflow.errors.ConfigError` that names the field path
(``decode.device``) and, for choices, the allowed values.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from mixflow.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any) -> int:
    """``"64MiB"`` / ``"1.5GB"`` / ``4096`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a byte size such as 64MiB")
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"expected a byte size such as 64MiB or 1GB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    shards: str = Field(description="Directory holding *.tar shards with DALI *.idx index files, or a URL "
                                    "(s3://, gs://, https://, file://) of a prefix holding them.")
    cache_dir: str | None = Field(
        None, description="Where shards read from a URL are cached on each node (whole shards, shared by the "
                          "node's readers). Default: <tmp>/mixflow-shard-cache.")
    cache_limit: Annotated[int, Field(gt=0)] = Field(
        10 * 2**30, description="Bytes the shard cache may hold (least recently used shards evicted); at least "
                                "the largest shard, better shuffle_window + 1 shards per reader on a node.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a URL in `shards` (e.g. {client_kwargs: "
                                          "{endpoint_url: ...}}); never credentials: those come from the "
                                          "environment (AWS_* variables, ~/.aws, instance roles).")
    demo: Literal["digits", "photos"] | None = Field(
        None, description="Build this demo set into `shards` first when the directory holds no shards.")
    num_classes: int = Field(gt=1)
    shard_size: Annotated[int, Field(gt=0)] = Field(2**20, description="Target shard size when building the demo.")
    shuffle_window: int = Field(4, ge=1, description="Shards whose samples are shuffled together.")

    _parse_size = field_validator("shard_size", "cache_limit", mode="before")(lambda v: parse_bytes(v))
    _no_secrets = field_validator("storage_options")(lambda v: _check_storage_options(v))

    @property
    def store(self):
        """How readers reach shards behind a URL (:class:`~mixflow.data.object_store.StoreConfig`)."""
        return _store_config(self)


def _check_storage_options(options: dict) -> dict:
    from mixflow.data.object_store import check_storage_options

    check_storage_options(options)
    return options


def _store_config(data):
    from mixflow.data.object_store import StoreConfig

    return StoreConfig.make(data.cache_dir, data.cache_limit, data.storage_options)


class DecodeSpec(_Strict):
    device: Literal["auto", "cpu", "gpu"] = "auto"
    size: tuple[int, int] = Field((224, 224), description="Output (height, width).")
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    antialias: bool = Field(False, description="Antialiased resize (slower on CPU).")
    resize: Literal["auto", "dali", "opencv"] = Field(
        "auto", description="Who resizes the decoded crop: 'auto' is OpenCV on CPU without antialias "
                            "(about 10x faster than DALI's CPU resize), DALI otherwise.")
    normalize: bool = Field(False, description="Emit float CHW normalized by mean/std instead of uint8 HWC.")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    threads: int = Field(1, ge=1, description="DALI CPU threads per decoder actor.")
    max_pixels: int | None = Field(
        89_478_485, ge=1, description="Largest image (width x height, read from its header before decoding) "
                                      "decoded; a larger one is a bad sample (on_error). PIL's MAX_IMAGE_PIXELS; "
                                      "null: no limit.")
    check_scans: bool = Field(
        True, description="Walk each JPEG's entropy-coded data before decoding (baseline/sequential "
                          "Huffman): what libjpeg would only warn about (garbage behind a valid header, a "
                          "scan cut short) makes the sample suspect, counted in the summary and listed in "
                          "suspect.jsonl. Costs about a third to a half of a CPU decode per photo; false "
                          "skips it (such samples then decode to noise unnoticed).")

    @model_validator(mode="after")
    def _check_ranges(self) -> "DecodeSpec":
        if min(self.size) < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.resize == "opencv" and (self.antialias or self.device == "gpu"):
            raise ValueError("resize 'opencv' is the CPU fast path without antialias; it cannot serve "
                             f"antialias={self.antialias}, device={self.device!r} (use 'auto' or 'dali')")
        return self

    def host_resize(self, device: str) -> bool:
        """Whether crops are resized by OpenCV on the host after DALI decodes them on ``device``."""
        if self.resize == "auto":
            return device == "cpu" and not self.antialias
        return self.resize == "opencv"


class _MixCommon(_Strict):
    prob: float = Field(1.0, ge=0.0, le=1.0, description="Probability that a batch (or element) is mixed.")
    mode: Literal["batch", "pair", "elem"] = "batch"
    pairing: Literal["derangement", "flip", "roll"] = "derangement"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class NoMixSpec(_Strict):
    method: Literal["none"]
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class MixUpSpec(_MixCommon):
    method: Literal["mixup"]
    alpha: float = Field(0.8, gt=0.0)


class CutMixSpec(_MixCommon):
    method: Literal["cutmix"]
    alpha: float = Field(1.0, gt=0.0)
    correct_lam: bool = True
    minmax: tuple[float, float] | None = None


class MixupCutmixSpec(_MixCommon):
    """timm's ``Mixup`` recipe (DeiT: mixup_alpha 0.8, cutmix_alpha 1.0, switch_prob 0.5)."""

    method: Literal["mixup_cutmix"]
    mixup_alpha: float = Field(0.8, ge=0.0)
    cutmix_alpha: float = Field(1.0, ge=0.0)
    minmax: tuple[float, float] | None = Field(None, description="CutMix box side bounds (timm cutmix_minmax).")
    switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    correct_lam: bool = True

    @model_validator(mode="after")
    def _one_enabled(self) -> "MixupCutmixSpec":
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0 and self.minmax is None:
            raise ValueError("at least one of mixup_alpha, cutmix_alpha, minmax must be enabled")
        return self


class ResizeMixSpec(_MixCommon):
    """ResizeMix (Qin et al. 2020): ``tau ~ U(scope)``, the whole partner resized into the box."""

    method: Literal["resizemix"]
    scope: tuple[float, float] = (0.1, 0.8)
    interpolation: Literal["nearest", "bilinear"] = "nearest"

    @field_validator("scope")
    @classmethod
    def _scope_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"scope must satisfy 0 < min <= max <= 1, got {v}")
        return v


class FMixSpec(_MixCommon):
    """FMix (Harris et al. 2020): low-frequency Fourier masks; paper defaults alpha 1, decay_power 3."""

    method: Literal["fmix"]
    alpha: float = Field(1.0, gt=0.0)
    decay_power: float = Field(3.0, ge=0.0)
    max_soft: float = Field(0.0, ge=0.0, le=0.5)
    reference_spectrum: bool = Field(False, description="Reproduce the official code's spectrum (axis bug).")


class MaskMixSpec(_MixCommon):
    """MaskMix (MixPro, Zhao et al. ICLR 2023); official DeiT configs: patch_size 14, mask_patch 56."""

    method: Literal["maskmix"]
    alpha: float = Field(1.0, gt=0.0)
    patch_size: int = Field(14, ge=1, description="The model's patch (token) size in pixels.")
    mask_patch: int = Field(56, ge=1, description="Mask cell side in pixels: a multiple of patch_size.")

    @field_validator("mask_patch")
    @classmethod
    def _multiple_of_patch(cls, v: int, info: ValidationInfo) -> int:
        patch = info.data.get("patch_size")
        if patch and v % patch:
            raise ValueError(f"mask_patch must be a multiple of patch_size {patch}, got {v}")
        return v


class PatchMixingSpec(_MixCommon):
    """Patch Mixing (Lee et al. 2023): partner patches on the model's patch grid."""

    method: Literal["patch_mixing"]
    alpha: float = Field(1.0, gt=0.0)
    patch_size: int = Field(16, ge=1)


class TransMixSpec(_MixCommon):
    """TransMix (Chen et al. CVPR 2022): CutMix pixels, attention label on the trainer; DeiT recipe."""

    method: Literal["transmix"]
    mixup_alpha: float = Field(0.8, ge=0.0)
    cutmix_alpha: float = Field(1.0, ge=0.0)
    switch_prob: float = Field(0.5, ge=0.0, le=1.0, description="Probability of CutMix (else MixUp).")
    minmax: tuple[float, float] | None = None
    correct_lam: bool = True

    @model_validator(mode="after")
    def _cutmix_enabled(self) -> "TransMixSpec":
        if self.cutmix_alpha == 0 and self.minmax is None:
            raise ValueError("transmix needs cutmix_alpha > 0 or minmax (its label is defined on CutMix boxes)")
        return self


class SMMixSpec(_Strict):
    """SMMix (Chen et al. ICCV 2023): side length drawn here, windows pasted on the trainer."""

    method: Literal["smmix"]
    mixup_alpha: float = Field(0.8, ge=0.0)
    switch_prob: float = Field(0.5, ge=0.0, le=1.0, description="Probability of SMMix (else MixUp).")
    token_grid: int = Field(14, ge=1, description="Tokens per image side (224 px / 16 px patches).")
    min_side_ratio: float = Field(0.25, gt=0.0, le=1.0)
    max_side_ratio: float = Field(0.75, gt=0.0, le=1.0)
    prob: float = Field(1.0, ge=0.0, le=1.0)
    pairing: Literal["derangement", "flip", "roll"] = "derangement"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _side_range(self) -> "SMMixSpec":
        lo, hi = int(self.token_grid * self.min_side_ratio), int(self.token_grid * self.max_side_ratio)
        if not 1 <= lo <= hi:
            raise ValueError(f"min_side_ratio/max_side_ratio give window sides {lo}..{hi} tokens; "
                             f"need 1 <= min <= max")
        return self


class ManifoldMixupSpec(_MixCommon):
    """Manifold Mixup (Verma et al. ICML 2019): alpha 2.0, layer drawn from {0, 1, 2} (0 = input)."""

    method: Literal["manifold_mixup"]
    alpha: float = Field(2.0, gt=0.0)
    layers: tuple[Annotated[int, Field(ge=0)], ...] = Field((0, 1, 2), min_length=1)


class CMixupSpec(_Strict):
    """C-Mixup (Yao et al. NeurIPS 2022), regression: alpha 2.0, kernel bandwidth sigma 1.0."""

    method: Literal["c_mixup"]
    alpha: float = Field(2.0, gt=0.0)
    sigma: float = Field(1.0, gt=0.0, description="Bandwidth of the label kernel exp(-d^2 / (2 sigma^2)).")
    mode: Literal["batch", "elem"] = "batch"


class Mix3DSpec(_Strict):
    """Mix3D (Nekrasov et al. 3DV 2021): point-cloud scenes concatenated in pairs."""

    method: Literal["mix3d"]
    centre: bool = True


class BeatSyncMixupSpec(_MixCommon):
    """Beat-synchronous mixup (MusicLDM, Chen et al. 2023): lam ~ Beta(5, 5), tempo-matched partners."""

    method: Literal["beat_sync_mixup"]
    alpha: float = Field(5.0, gt=0.0)
    sample_rate: float = Field(16000.0, gt=0.0, description="Samples (or latent frames) per second.")
    pairing: Literal["derangement", "flip", "roll", "tempo"] = "tempo"


ChoosableMixSpec = Annotated[Union[MixUpSpec, CutMixSpec, MixupCutmixSpec, ResizeMixSpec, FMixSpec, MaskMixSpec,
                                   PatchMixingSpec], Field(discriminator="method")]


class MixChoice(_Strict):
    weight: float = Field(gt=0.0, allow_inf_nan=False, description="Relative probability of this method.")
    mix: ChoosableMixSpec

    @field_validator("mix")
    @classmethod
    def _no_own_smoothing(cls, v: BaseModel) -> BaseModel:
        if v.label_smoothing:
            raise ValueError("set label_smoothing once on the choice, not per method")
        return v


class MethodChoiceSpec(_Strict):
    """One method per batch, drawn by weight (DeiT: mixup alpha 0.8 / cutmix alpha 1.0, 0.5 each)."""

    method: Literal["choice"]
    choices: list[MixChoice] = Field(min_length=1)
    prob: float = Field(1.0, ge=0.0, le=1.0, description="Probability that a batch is mixed at all.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Applies to every choice.")


MixSpec = Annotated[Union[NoMixSpec, MixUpSpec, CutMixSpec, MixupCutmixSpec, ResizeMixSpec, FMixSpec, MaskMixSpec,
                          PatchMixingSpec, MethodChoiceSpec, TransMixSpec, SMMixSpec, ManifoldMixupSpec,
                          CMixupSpec, Mix3DSpec, BeatSyncMixupSpec], Field(discriminator="method")]
MIX_SPECS: dict[str, type[BaseModel]] = {
    "none": NoMixSpec, "mixup": MixUpSpec, "cutmix": CutMixSpec, "mixup_cutmix": MixupCutmixSpec,
    "resizemix": ResizeMixSpec, "fmix": FMixSpec, "maskmix": MaskMixSpec, "patch_mixing": PatchMixingSpec,
    "choice": MethodChoiceSpec, "transmix": TransMixSpec, "smmix": SMMixSpec, "manifold_mixup": ManifoldMixupSpec,
    "c_mixup": CMixupSpec, "mix3d": Mix3DSpec, "beat_sync_mixup": BeatSyncMixupSpec}


class ChannelSpec(_Strict):
    max_items: int = Field(4, ge=1, description="Batches queued per trainer rank.")
    max_bytes: int = Field(64 * 2**20, ge=1, description="Bytes queued per trainer rank (e.g. 64MiB).")
    shared_memory: bool = Field(
        True, description="Image batches for a trainer on its mixer's node go through shared-memory slots "
                          "(max_items + 4 batches per rank in /dev/shm, fewer when max_bytes queues fewer) instead of Ray's object store; a batch "
                          "then stays valid until the trainer takes the next one.")

    _parse_size = field_validator("max_bytes", mode="before")(lambda v: parse_bytes(v))


class StageResources(_Strict):
    """What one actor of a stage asks Ray for (Ray's ``num_cpus``, ``num_gpus``, ``memory``, custom
    ``resources``). A custom resource, e.g. ``{"data": 0.01}`` given to the nodes that hold the
    shards (``ray start --resources '{"data": 1}'``), pins the stage to those nodes."""

    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    memory: int | None = Field(None, ge=0, description="Bytes of memory Ray reserves for the actor (e.g. 2GiB).")
    resources: dict[str, float] = Field(default_factory=dict)

    _parse_size = field_validator("memory", mode="before")(lambda v: None if v is None else parse_bytes(v))

    @field_validator("resources")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v > 0 or k in ("CPU", "GPU", "memory")}
        if bad:
            raise ValueError(f"custom resources need a name other than CPU/GPU/memory and an amount > 0, got {bad}")
        return value


class RuntimeSpec(_Strict):
    readers_per_rank: int = Field(1, ge=1)
    fuse_reader: bool = Field(
        True, description="With readers_per_rank 1, decode inside the rank's mixer actor (no decoder actor, "
                          "one object-store hop less per batch). Ignored with more readers per rank.")
    prefetch: int = Field(2, ge=1, description="Decoded batches requested ahead by each mixer.")
    address: str | None = Field(None, description="Ray address; None starts an embedded local Ray.")
    start_timeout: float = Field(
        600.0, gt=0, description="Seconds the pipeline's actors have to start (placed and constructed); a "
                                 "stage not started by then fails the start, named (typically: no node has "
                                 "room for its runtime.resources).")
    connect_timeout: float = Field(
        600.0, gt=0, description="Seconds every rank has to connect its feed once the pipeline is up "
                                 "(mixflow.start / serve); a rank that has not by then fails the pipeline, named.")
    resources: dict[Literal["decoder", "mixer", "trainer", "channel", "producer"], StageResources] = Field(
        default_factory=dict,
        description="Per stage, what each of its actors asks Ray for; unset fields take the defaults "
                    "(mixflow.runtime.placement: on a multi-node cluster what the stage uses, e.g. a CPU per "
                    "mixer and trainer, decode.threads per reader, a GPU per trainer on GPU clusters; on one "
                    "node nothing, so any spec runs on a laptop).")
    runtime_env: dict[str, Any] | None = Field(
        None, description="Ray's runtime_env for the job mixflow connects (e.g. {working_dir: ., pip: [...]}): "
                          "ships your code (a trainer.entrypoint module) and its packages to every node of a "
                          "cluster; a relative working_dir is the driver's. Applies when this process connects "
                          "to Ray (mixflow run, serve, start).")
    placement: Literal["colocate", "spread"] = Field(
        "colocate", description="Multi-node: 'colocate' places each rank's trainer, mixer, channel (and readers, "
                                "unless their resources pin them elsewhere) on one node, so batches go through "
                                "the shared-memory ring; 'spread' leaves it to Ray's SPREAD strategy.")


def _check_entrypoint(value: str | None) -> str | None:
    module, sep, function = (value or "").rpartition(":")
    if value is not None and (not sep or not module or not function.isidentifier()):
        raise ValueError(f"expected 'package.module:function' or 'path/to/file.py:function', got {value!r}")
    return value


class TrainerSpec(_Strict):
    ranks: int = Field(2, ge=1)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1, description="Samples per batch delivered to each rank.")
    model: Literal["digits_cnn", "none"] = Field(
        "digits_cnn", description="A built-in training loop, run like an entrypoint: 'digits_cnn' "
                                  "(mixflow.demos.digits_loop:train) or 'none', which only iterates the feed.")
    entrypoint: str | None = Field(
        None, description="Your training function, 'package.module:function' or 'path/to/file.py:function': "
                          "each rank actor calls it with (feed, context) instead of trainer.model's loop.")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    throttle: dict[int, float] = Field(
        default_factory=dict, description="Seconds of sleep per step by rank: simulates slow ranks (soak tests).")

    _entrypoint = field_validator("entrypoint")(lambda v: _check_entrypoint(v))


class PipelineSpec(_Strict):
    kind: Literal["image"] = "image"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    run_dir: str | None = Field(None, description="Defaults to runs/<name>.")
    on_error: Literal["raise", "skip"] = "raise"
    data: DataSpec
    decode: DecodeSpec = DecodeSpec()
    mix: MixSpec = Field(default_factory=lambda: NoMixSpec(method="none"))
    channel: ChannelSpec = ChannelSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    trainer: TrainerSpec = TrainerSpec()

    @model_validator(mode="after")
    def _mix_fits_images(self) -> "PipelineSpec":
        for method in _methods(self.mix):
            if method in NON_IMAGE_METHODS:
                raise ValueError(f"mix.method {method!r} mixes {NON_IMAGE_METHODS[method]}, not images; "
                                 f"the image pipeline takes: {', '.join(m for m in MIX_SPECS if m not in NON_IMAGE_METHODS)}")
            if self.trainer.entrypoint is not None:
                continue  # the user's model finishes model-side methods (mixflow.train.mix_label_helpers)
            if method in MODEL_SIDE_METHODS and self.trainer.model == "none":
                raise ValueError(f"mix.method {method!r} finishes its mixing inside the model; "
                                 "trainer.model 'none' has no model")
            if method in ATTENTION_METHODS:
                raise ValueError(f"mix.method {method!r} needs the model's attention map; trainer.model "
                                 f"{self.trainer.model!r} has no attention (use it from a ViT training loop "
                                 "with mixflow.train.mix_label_helpers)")
        return self

    @model_validator(mode="after")
    def _throttle_fits_ranks(self) -> "PipelineSpec":
        for rank, seconds in self.trainer.throttle.items():
            if not 0 <= rank < self.trainer.ranks:
                raise ValueError(f"trainer.throttle: rank {rank} is outside 0..{self.trainer.ranks - 1} "
                                 f"(trainer.ranks is {self.trainer.ranks})")
            if not seconds >= 0 or seconds == float("inf"):
                raise ValueError(f"trainer.throttle: rank {rank}: seconds per step must be >= 0 and finite, "
                                 f"got {seconds}")
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


NON_IMAGE_METHODS = {"c_mixup": "regression targets", "mix3d": "point-cloud scenes",
                     "beat_sync_mixup": "audio waveforms"}
MODEL_SIDE_METHODS = ("manifold_mixup", "smmix")  # x leaves the pipeline unmixed
ATTENTION_METHODS = ("smmix",)


def _methods(mix: BaseModel) -> list[str]:
    if isinstance(mix, MethodChoiceSpec):
        return [m for choice in mix.choices for m in _methods(choice.mix)]
    return [mix.method]


def _field_path(loc: tuple[Any, ...]) -> str:
    # Pydantic puts the discriminator tag in the location of union members: drop it.
    parts = [str(p) for p in loc if p not in MIX_SPECS]
    return ".".join(parts) or "<root>"


def _explain(err: dict[str, Any], model: type[BaseModel]) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        parent = _resolve_model(model, err["loc"][:-1])
        allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
        return f"unknown field; allowed fields: {allowed}"
    if err["type"] == "missing":
        return "required field is missing"
    if "input" in err and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return msg


def _resolve_model(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if part in MIX_SPECS:
            current = MIX_SPECS[part]
            continue
        if isinstance(part, int):  # an item of a list field (mix.choices.0)
            current = (get_args(current) or (None,))[0]
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else ann
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def validate_spec(raw: dict[str, Any], source: str | None = None) -> "PipelineSpec | TokenPipelineSpec":
    """Validate a raw mapping into a :class:`PipelineSpec` (``kind: image``, the default) or a
    :class:`TokenPipelineSpec` (``kind: tokens``), or raise :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError([("<root>", f"expected a mapping, got {type(raw).__name__}")], source)
    kinds = {"image": PipelineSpec, "tokens": TokenPipelineSpec}
    kind = raw.get("kind", "image")
    if kind not in kinds:
        raise ConfigError([("kind", f"unknown pipeline kind {kind!r}; allowed: {', '.join(kinds)}")], source)
    model = kinds[kind]
    strict = strict_problems(raw, model)
    if strict:
        raise ConfigError(strict, source)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = [_named_root(_field_path(e["loc"]), _explain(e, model)) for e in exc.errors()]
        raise ConfigError(problems, source) from None


def _named_root(path: str, message: str) -> tuple[str, str]:
    """A spec-wide check's ``Value error, trainer.throttle: ...`` as ``(trainer.throttle, ...)``."""
    named = re.match(r"Value error, ([a-z_]+(?:\.[a-z_]+)+): (.*)$", message, re.DOTALL)
    return (named[1], named[2]) if path == "<root>" and named else (path, message)


def validate_mix(raw: dict[str, Any]) -> BaseModel:
    """Validate a ``mix`` section on its own: any method, also those the image pipeline cannot run
    (C-Mixup, Mix3D, beat-synchronous mixup) for users who call the mixers from their own loaders."""
    try:
        return TypeAdapter(MixSpec).validate_python(raw)
    except ValidationError as exc:
        problems = [(_field_path(("mix", *e["loc"])), _explain({**e, "loc": ("mix", *e["loc"])}, PipelineSpec))
                    for e in exc.errors()]
        raise ConfigError(problems) from None


def load_spec(path: str | Path, overrides: list[str] | None = None,
              base: Path | None = None) -> "PipelineSpec | TokenPipelineSpec":
    """Load a YAML spec; ``overrides`` are ``dotted.path=value`` strings (value parsed as YAML).
    ``base``: resolve the spec's relative paths against it (:func:`resolve_paths`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("<file>", f"no such pipeline spec: {path}")], str(path))
    raw = load_yaml(path.read_text(), str(path)) or {}
    for item in overrides or []:
        apply_override(raw, item)
    if base is not None and isinstance(raw, dict):
        raw = resolve_paths(raw, base)
    return validate_spec(raw, str(path))


def resolve_paths(raw: dict, base: Path) -> dict:
    """``data.shards``, ``run_dir``, a file ``trainer.entrypoint`` and ``runtime.runtime_env.working_dir``
    made absolute against ``base``
    (the driver's directory), so actors started anywhere on the cluster read, write and import
    what the driver meant (a relative path would be taken from each worker's own directory)."""
    data = dict(raw.get("data", {}))
    if data.get("shards") and "://" not in str(data["shards"]):  # a URL is not a path
        data["shards"] = str((base / data["shards"]).resolve())
    out = {**raw, "data": data}
    trainer = dict(raw.get("trainer", {}))
    module, sep, function = str(trainer.get("entrypoint") or "").rpartition(":")
    if sep and module.endswith(".py"):
        trainer["entrypoint"] = f"{(base / module).resolve()}:{function}"
        out["trainer"] = trainer
    for key in ("save_model", "reference_model"):  # token pipelines: DoReMi's reference model
        if trainer.get(key):
            trainer[key] = str((base / trainer[key]).resolve())
            out["trainer"] = trainer
    runtime = dict(raw.get("runtime") or {})
    env = runtime.get("runtime_env")
    if isinstance(env, dict) and isinstance(env.get("working_dir"), str) and "://" not in env["working_dir"]:
        runtime["runtime_env"] = {**env, "working_dir": str((base / env["working_dir"]).resolve())}
        out["runtime"] = runtime
    run_dir = raw.get("run_dir") or f"runs/{raw.get('name', 'run')}"
    out["run_dir"] = str((base / run_dir).resolve())
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested mapping (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError([(item, "override must look like field.path=value")])
    key, value = item.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([(key, f"{part} is not a section")])
    try:
        node[parts[-1]] = yaml.load(value, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([(f"--set {item}", f"the value {value!r} is not valid YAML "
                                             f"({getattr(exc, 'problem', None) or exc}{at})")]) from None


# --- strict scalars and YAML without duplicate keys -----------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (naming the
    key and both lines) instead of silently keeping the last value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} at line {line} (first given at line {first})",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str | None = None) -> Any:
    """Parse a spec's YAML (duplicate keys refused), or raise :class:`ConfigError` naming ``source``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.constructor.ConstructorError as exc:
        if exc.problem and exc.problem.startswith("duplicate key"):
            raise ConfigError([("<file>", exc.problem)], source) from None
        raise ConfigError([("<file>", f"not valid YAML: {exc}")], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([("<file>", f"not valid YAML: {exc}")], source) from None


def _scalar_type(annotation: Any) -> type | None:
    """``int``, ``float`` or ``bool`` when a field holds one of them (optionally None), else None."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar_type(get_args(annotation)[0])
    if origin in (Union, UnionType):
        kinds = {_scalar_type(a) for a in get_args(annotation) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    return annotation if annotation in (int, float, bool) else None


def _nested_model(annotation: Any, value: Any) -> type[BaseModel] | None:
    """The model a nested section ``value`` is validated with (a mix section: by its ``method``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Annotated, Union, UnionType) and isinstance(value, dict):
        return MIX_SPECS.get(value.get("method")) if isinstance(value.get("method"), str) else None
    return None


_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def strict_problems(raw: Any, model: type[BaseModel], path: str = "") -> list[tuple[str, str]]:
    """``(field path, message)`` for every number or flag field of ``raw`` given with another type
    (``batch_size: true``, ``epochs: "2"``, ``lr: "0.1"``, ``antialias: "yes"``): pydantic's lax
    mode would convert them. Fields parsed by a ``before`` validator (byte sizes) take strings."""
    if not isinstance(raw, dict):
        return []
    parsed = {f for d in model.__pydantic_decorators__.field_validators.values() if d.info.mode == "before"
              for f in d.info.fields}
    problems: list[tuple[str, str]] = []
    for name, field in model.model_fields.items():
        if name not in raw or raw[name] is None:
            continue
        value, where = raw[name], f"{path}.{name}" if path else name
        kind = _scalar_type(field.annotation)
        if kind is not None:
            ok = (isinstance(value, bool) if kind is bool else not isinstance(value, bool) and
                  isinstance(value, int if kind is int else (int, float)))
            if not ok and name not in parsed:
                problems.append((where, f"must be {_KIND_WORDS[kind]}, got {value!r} ({type(value).__name__})"))
            continue
        items = value if get_origin(field.annotation) is list and isinstance(value, list) else None
        if items is not None:
            inner = (get_args(field.annotation) or (None,))[0]
            for i, item in enumerate(items):
                sub = _nested_model(inner, item)
                if sub is not None:
                    problems += strict_problems(item, sub, f"{where}.{i}")
        elif (sub := _nested_model(field.annotation, value)) is not None:
            problems += strict_problems(value, sub, where)
    return problems


# --- token pipelines (``kind: tokens``): online data-mixture reweighting -----------------


class TokenDataSpec(_Strict):
    shards: str = Field(description="Directory with one sub-directory of Parquet token shards per domain, or a "
                                    "URL (s3://, gs://, https://, file://) of a prefix laid out the same way.")
    cache_dir: str | None = Field(
        None, description="Where token shards read from a URL are cached on each node. "
                          "Default: <tmp>/mixflow-shard-cache.")
    cache_limit: Annotated[int, Field(gt=0)] = Field(10 * 2**30, description="Bytes the shard cache may hold.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for a URL in `shards`; never credentials.")
    machine_domains: list[str] | None = Field(
        None, description="Build these real text domains from files on this machine when `shards` is empty.")
    max_bytes_per_domain: Annotated[int, Field(gt=0)] = Field(2 * 2**20, description="Cap per built domain.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Documents held out per domain (built domains).")
    seq_len: int = Field(128, ge=8, description="Tokens per training sequence (inputs; targets shift by one).")
    eval_sequences: int = Field(32, ge=2, description="Held-out sequences per domain: half validation, half test.")

    _parse_size = field_validator("max_bytes_per_domain", "cache_limit", mode="before")(lambda v: parse_bytes(v))
    _no_secrets = field_validator("storage_options")(lambda v: _check_storage_options(v))

    @property
    def store(self):
        """How readers reach token shards behind a URL (:class:`~mixflow.data.object_store.StoreConfig`)."""
        return _store_config(self)


class MixtureSpec(_Strict):
    policy: str = Field("stratified", description="A name from mixflow.mixture.registry.POLICIES.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the policy.")
    floor: float = Field(0.0, ge=0.0, lt=1.0, description="Every domain keeps at least this proportion.")

    @model_validator(mode="after")
    def _policy_builds(self) -> "MixtureSpec":
        from mixflow.mixture.registry import POLICIES, check_policy_params

        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; allowed: {', '.join(sorted(POLICIES))}")
        check_policy_params(self.policy, self.params)
        return self


class LMTrainerSpec(_Strict):
    ranks: int = Field(2, ge=1)
    steps: int = Field(300, ge=1, description="Training steps per rank (the token budget is steps x batch x seq_len x ranks).")
    batch_size: int = Field(16, ge=1, description="Sequences per rank per step.")
    model: Literal["byte_gpt", "unigram"] = Field(
        "byte_gpt", description="The built-in LM loop (mixflow.demos.lm_loop:train) trains this model: 'byte_gpt', "
                                "or 'unigram', which counts bytes: real losses at almost no compute (benchmarks).")
    entrypoint: str | None = Field(
        None, description="Your training function, 'package.module:function' or 'path/to/file.py:function': "
                          "each rank actor calls it with (feed, context) instead of trainer.model's loop.")
    d_model: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    lr: float = Field(3e-3, gt=0)
    eval_every: int = Field(50, ge=0, description="Test-split evaluation every N steps on rank 0 (0: only at the end).")
    grad_stats_every: int | None = Field(
        None, ge=0, description="Report <grad L_val, grad L_d> every N steps (TiKMiX, DoGE). "
                                "None: every 5 steps when the policy uses them, else never.")
    throttle: dict[int, float] = Field(default_factory=dict, description="Seconds of sleep per step by rank.")
    save_model: str | None = Field(
        None, description="Rank 0 of the built-in LM loop saves the trained model here at the end (e.g. DoReMi's "
                          "reference model, trained on the stratified mixture).")
    reference_model: str | None = Field(
        None, description="A model saved by trainer.save_model (same trainer.model and sizes): the built-in LM "
                          "loop measures its per-domain loss on every batch and reports it as ref_loss (DoReMi's "
                          "proxy phase).")

    _entrypoint = field_validator("entrypoint")(lambda v: _check_entrypoint(v))


class TokenPipelineSpec(_Strict):
    kind: Literal["tokens"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    run_dir: str | None = Field(None, description="Defaults to runs/<name>.")
    on_error: Literal["raise", "skip"] = "raise"
    data: TokenDataSpec
    mixture: MixtureSpec = Field(default_factory=MixtureSpec)
    channel: ChannelSpec = ChannelSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    trainer: LMTrainerSpec = LMTrainerSpec()

    @model_validator(mode="after")
    def _policy_gets_its_inputs(self) -> "TokenPipelineSpec":
        mix, t = self.mixture, self.trainer
        if mix.policy == "doremi":
            table = mix.params.get("ref_loss")
            if table is None and t.reference_model is None and t.entrypoint is None:
                raise ValueError("mixture.params.ref_loss: DoReMi needs reference losses: give a per-domain table "
                                 "(mixture.params.ref_loss: [...], one value per domain) or a reference model "
                                 "(trainer.reference_model: a file written by a run with trainer.save_model, "
                                 "e.g. on the stratified mixture)")
            domains = self.data.machine_domains
            if table is not None and domains and len(table) != len(domains):
                raise ValueError(f"mixture.params.ref_loss: {len(table)} values for {len(domains)} domains "
                                 f"({', '.join(domains)})")
        if t.reference_model is not None and t.entrypoint is not None:
            raise ValueError("trainer.reference_model: only the built-in LM loop (trainer.model) reads it; "
                             "your trainer.entrypoint reports ref_loss itself")
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")
