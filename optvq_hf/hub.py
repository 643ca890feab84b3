"""
Sharing a tokenizer on the Hugging Face Hub: a model card filled from the config and the evaluation numbers, and an
upload helper with a dry-run mode.

The training and conversion scripts use it as

```python
from optvq_hf.hub import Evaluation, push_folder_to_hub, render_model_card

card = render_model_card(
    model.config,
    repo_id="my-org/optvq-tiny",
    evaluation=Evaluation.from_metrics_file("eval/metrics.json", dataset="ILSVRC/imagenet-1k", split="validation"),
    training_details={"data": "...", "steps": 1000},      # or conversion_details={...} for a converted checkpoint
    num_parameters=model.num_parameters(),
)
card.save(output_dir / "README.md")
push_folder_to_hub(output_dir, "my-org/optvq-tiny", dry_run=True)   # prints and returns what would be uploaded
```

The card template is `templates/model_card.md`, package data (a Jinja template whose YAML header is huggingface_hub's
`ModelCardData`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, HFValidationError, filter_repo_objects, validate_repo_id

from .configuration_optvq import OptVQConfig
from .tokens import TokenLayout

DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"
TASK_TYPE = "image-to-image"  # the Hub task of an autoencoder's reconstruction; the metrics are reconstruction metrics
BASE_TAGS = ("optvq", "vector-quantization", "optimal-transport", "image-tokenizer", "vqgan", "autoencoder")

# Display names and Hub metric ids of the numbers `examples/evaluate.py` writes (optvq_hf.metrics.METRIC_NAMES).
METRIC_LABELS = {
    "psnr": "PSNR (dB, Y channel)",
    "psnr_rgb": "PSNR (dB, RGB)",
    "ssim": "SSIM",
    "lpips": "LPIPS (AlexNet)",
    "lpips_vgg": "LPIPS (VGG)",
    "rfid": "rFID",
    "usage": "codebook usage",
    "perplexity": "codebook perplexity",
}
METRIC_TYPES = {"psnr_rgb": "psnr", "lpips_vgg": "lpips", "rfid": "fid"}

# Files of a training output folder that are not part of the model: resumable states, logs, caches.
DEFAULT_UPLOAD_IGNORE = (
    "checkpoint-*",
    "checkpoint-*/*",
    "checkpoints/*",
    "logs/*",
    "runs/*",
    "*events.out.tfevents*",
    "*__pycache__*",
    "*.pyc",
)
# What huggingface_hub's `upload_folder` always leaves out, whatever the patterns.
_HUB_ALWAYS_IGNORED = tuple(DEFAULT_IGNORE_PATTERNS)


@dataclass
class Evaluation:
    """
    Evaluation numbers for the card, with the data and protocol they were measured with.

    Args:
        metrics (`Mapping[str, float | None]`): metric name -> value, e.g. the contents of `examples/evaluate.py`'s
            `metrics.json` (`psnr`, `ssim`, `lpips`, `rfid`, `usage`, ...). `None` (an undefined value) is listed as
            "n/a" in the table and left out of the card's metadata.
        dataset (`str`): the dataset: a Hub id (`"ILSVRC/imagenet-1k"`, also written to the metadata's `datasets`)
            or, for local data, a short description.
        dataset_name (`str`, *optional*): the display name; defaults to `dataset`.
        split (`str`, *optional*): the split evaluated.
        num_images (`int`, *optional*): how many images were evaluated.
        protocol (`Mapping[str, str]`, *optional*): metric name -> how it was computed (shown next to the value).
        is_hub_dataset (`bool`, *optional*, defaults to `True`): whether `dataset` is a Hub id.
    """

    metrics: Mapping[str, float | None]
    dataset: str
    dataset_name: str | None = None
    split: str | None = None
    num_images: int | None = None
    protocol: Mapping[str, str] = field(default_factory=dict)
    is_hub_dataset: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"Evaluation.dataset must name the evaluation data, got {self.dataset!r}")
        if not isinstance(self.metrics, Mapping) or not self.metrics:
            raise ValueError(f"Evaluation.metrics must be a non-empty mapping of name -> value, got {self.metrics!r}")
        for name, value in self.metrics.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"metric {name!r} must be a finite number or None, got {value!r}")

    @classmethod
    def from_metrics_file(cls, path: str | os.PathLike, dataset: str, **kwargs) -> Evaluation:
        """Read the `metrics.json` that `examples/evaluate.py` writes ({name: value or null})."""
        try:
            metrics = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the metrics file {str(path)!r}: {error}") from error
        return cls(metrics=metrics, dataset=dataset, **kwargs)

    def eval_results(self) -> list[EvalResult]:
        """The `model-index` entries (one per defined metric) of huggingface_hub's card metadata."""
        return [
            EvalResult(
                task_type=TASK_TYPE,
                task_name="Image reconstruction",
                dataset_type=self.dataset,
                dataset_name=self.dataset_name or self.dataset,
                dataset_split=self.split,
                metric_type=METRIC_TYPES.get(name, name),
                metric_name=METRIC_LABELS.get(name, name),
                metric_value=float(value),
            )
            for name, value in self.metrics.items()
            if value is not None
        ]

    def table_rows(self) -> list[dict[str, str]]:
        """One row (label, value, protocol) per metric for the card's table."""
        return [
            {
                "label": METRIC_LABELS.get(name, name),
                "value": "n/a" if value is None else f"{value:.4g}",
                "protocol": self.protocol.get(name, ""),
            }
            for name, value in self.metrics.items()
        ]


def architecture_rows(config: OptVQConfig, num_parameters: int | None = None) -> dict[str, str]:
    """The architecture facts shown in the card, from the config."""
    latent = config.latent_resolution
    rows = {
        "input": f"{config.in_channels} x {config.resolution} x {config.resolution}, pixel values in [-1, 1]",
        "backbone": f"{config.backbone} (channels {config.base_channels} x {list(config.channel_multipliers)}, "
        f"{config.num_res_blocks} ResNet block(s) per level, "
        + (f"attention at sides {list(config.attn_resolutions)})" if config.attn_resolutions else "no attention)")
        if config.backbone == "diffusion"
        else f"{config.backbone} (width {config.base_channels})",
        "latent grid": f"{latent} x {latent} (downsampling factor {config.downsample_factor})",
        "quantizer": f"{config.quantizer_type}: {config.num_heads} heads x {config.num_codes} shared codes of "
        f"dimension {config.code_dim}",
        "training assignment": f"Sinkhorn, epsilon {config.sinkhorn_epsilon}, {config.sinkhorn_iterations} "
        f"iterations, cost normalisation {config.cost_normalization!r}"
        if config.quantizer_type == "optvq"
        else "nearest code",
        "inference assignment": config.inference_assignment,
    }
    if num_parameters is not None:
        rows["parameters"] = f"{num_parameters:,}"
    return rows


def render_model_card(
    config: OptVQConfig,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    summary: str | None = None,
    evaluation: Evaluation | None = None,
    training_details: Mapping[str, Any] | None = None,
    conversion_details: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    num_parameters: int | None = None,
    base_model: str | None = None,
    license: str = "mit",
    tags: Sequence[str] = (),
    template_path: str | os.PathLike | None = None,
) -> ModelCard:
    """
    Fill the model card template with a config and the numbers of a run.

    Args:
        config (`OptVQConfig`): the model's configuration.
        repo_id (`str`, *optional*): the Hub repo the card is for (used in the usage snippet); default a placeholder.
        model_name (`str`, *optional*): the card's title and `model-index` name; defaults to the repo's name.
        summary (`str`, *optional*): a paragraph under the title (what data, what for).
        evaluation (`Evaluation`, *optional*): metric values with their dataset and protocol; they go to the table and
            to the metadata (`metrics`, `model-index`).
        training_details (`Mapping[str, Any]`, *optional*): facts of the training run (data, steps, batch size, ...),
            listed under "Training".
        conversion_details (`Mapping[str, Any]`, *optional*): facts of a conversion (source checkpoint, checks run),
            listed under "Conversion".
        datasets (`Sequence[str]`, *optional*): Hub ids of the training data, for the metadata's `datasets` (the
            evaluation dataset is added when it is a Hub id).
        num_parameters (`int`, *optional*): shown in the architecture table.
        base_model (`str`, *optional*): the Hub id this checkpoint was converted or fine-tuned from.
        license (`str`, *optional*, defaults to `"mit"`): the license id (the original OptVQ code is MIT).
        tags (`Sequence[str]`, *optional*): tags added to optvq-hf's own.
        template_path (`str` or `os.PathLike`, *optional*): a Jinja template; defaults to the repository's
            `model_card.md`.

    Returns:
        `huggingface_hub.ModelCard`: save it with `card.save(folder / "README.md")`.
    """
    if not isinstance(config, OptVQConfig):
        raise ValueError(f"config must be an OptVQConfig, got {type(config).__name__}")
    template = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE_PATH
    if not template.is_file():
        raise ValueError(
            f"model card template {str(template)!r} not found: pass template_path "
            "(the package's templates/model_card.md)"
        )
    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise ValueError(f"invalid repo_id {repo_id!r}: {error}") from error
    for name, details in (("training_details", training_details), ("conversion_details", conversion_details)):
        if details is not None and not isinstance(details, Mapping):
            raise ValueError(f"{name} must be a mapping of name -> value, got {type(details).__name__}")
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else "optvq")

    hub_datasets = list(datasets)
    if evaluation is not None and evaluation.is_hub_dataset:
        hub_datasets.append(evaluation.dataset)
    hub_datasets = list(dict.fromkeys(hub_datasets))  # unique, in order
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=list(dict.fromkeys([*BASE_TAGS, *tags])),
        pipeline_tag=TASK_TYPE,
        datasets=hub_datasets or None,
        metrics=list(dict.fromkeys(METRIC_TYPES.get(n, n) for n, v in evaluation.metrics.items() if v is not None))
        if evaluation
        else None,
        base_model=base_model,
        model_name=model_name,
        eval_results=evaluation.eval_results() if evaluation else None,
    )
    layout = TokenLayout(config.num_codes, config.num_heads, (config.latent_resolution,) * 2, vocabulary="per-head")
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        repo_id=repo_id or "<org>/<name>",
        summary=summary,
        architecture=architecture_rows(config, num_parameters),
        resolution=config.resolution,
        num_heads=config.num_heads,
        num_codes=config.num_codes,
        per_head_vocab_size=layout.vocab_size,
        tokens_per_image=layout.sequence_length,
        evaluation=evaluation.table_rows() if evaluation else None,
        eval_dataset=(evaluation.dataset_name or evaluation.dataset) if evaluation else None,
        eval_split=evaluation.split if evaluation else None,
        eval_images=evaluation.num_images if evaluation else None,
        training_details=dict(training_details or {}),
        conversion_details=dict(conversion_details or {}),
    )


@dataclass
class UploadSummary:
    """What `push_folder_to_hub` uploaded, or would upload in dry-run mode."""

    repo_id: str
    folder: Path
    files: list[tuple[str, int]]  # (path in the repo, size in bytes), sorted
    dry_run: bool
    commit_url: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def __str__(self) -> str:
        verb = "would upload" if self.dry_run else "uploaded"
        lines = [f"{verb} {len(self.files)} files ({_human(self.total_bytes)}) from {self.folder} to {self.repo_id}:"]
        lines += [f"  {path}  ({_human(size)})" for path, size in self.files]
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return "\n".join(lines)


def _human(size: float) -> str:
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1024
        if size < 1024 or unit == "GB":
            break
    return f"{size:.1f} {unit}"


def files_to_upload(
    folder: str | os.PathLike,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = DEFAULT_UPLOAD_IGNORE,
) -> list[tuple[str, int]]:
    """(relative path, size) of each file `upload_folder` would send with these patterns, sorted."""
    root = Path(folder)
    files = {path.relative_to(root).as_posix(): path for path in sorted(root.glob("**/*")) if path.is_file()}
    ignore = [*(ignore_patterns or ()), *_HUB_ALWAYS_IGNORED]
    allow = list(allow_patterns) if allow_patterns else None
    kept = filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore)
    return [(name, files[name].stat().st_size) for name in kept]


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    dry_run: bool = False,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload OptVQ tokenizer",
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = DEFAULT_UPLOAD_IGNORE,
    verbose: bool = True,
) -> UploadSummary:
    """
    Upload a finished model folder (from `save_pretrained`, with its README.md) to a Hub model repo, creating the repo
    if needed.

    Args:
        folder (`str` or `os.PathLike`): the folder; it must hold a `config.json`.
        repo_id (`str`): `"org/name"` or `"name"`.
        dry_run (`bool`, *optional*, defaults to `False`): list what would be uploaded, print it and return it, with
            no network access.
        private (`bool`, *optional*): visibility of a newly created repo.
        token (`str`, *optional*): a Hub token; defaults to the logged-in one.
        commit_message (`str`, *optional*): the commit message.
        revision (`str`, *optional*): the branch to commit to (created if missing).
        allow_patterns (`Sequence[str]`, *optional*): upload only matching files.
        ignore_patterns (`Sequence[str]`, *optional*, defaults to `DEFAULT_UPLOAD_IGNORE`): files left out
            (training checkpoints, logs, caches). `.git` and `.cache/huggingface` are always left out.
        verbose (`bool`, *optional*, defaults to `True`): print the list of files (and the commit URL).

    Returns:
        `UploadSummary`: the repo, the (path, size) of every file and, after a real upload, the commit URL.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"folder {str(folder)!r} is not a directory")
    if not (root / "config.json").is_file():
        raise ValueError(f"folder {str(folder)!r} has no config.json: save the model with save_pretrained first")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid repo_id {repo_id!r}: {error}") from error
    files = files_to_upload(root, allow_patterns, ignore_patterns)
    if not files:
        raise ValueError(f"nothing to upload from {str(folder)!r} with these allow/ignore patterns")
    summary = UploadSummary(repo_id=repo_id, folder=root, files=files, dry_run=dry_run)
    if dry_run:
        if verbose:
            print(summary)
        return summary
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:  # upload_folder needs the branch to exist
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=root,
            repo_type="model",
            commit_message=commit_message,
            revision=revision,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
        )
    except ConnectionError as error:  # huggingface_hub's OfflineModeIsEnabled and network failures
        raise ValueError(
            f"cannot push to {repo_id!r}: the Hub cannot be reached ({type(error).__name__}: {error}); unset "
            f"HF_HUB_OFFLINE and check the network, or pass dry_run=True / --dry_run to list what would be uploaded"
        ) from error
    summary.commit_url = getattr(commit, "commit_url", None) or str(commit)
    if verbose:
        print(summary)
    return summary


__all__ = [
    "DEFAULT_UPLOAD_IGNORE",
    "Evaluation",
    "UploadSummary",
    "architecture_rows",
    "files_to_upload",
    "push_folder_to_hub",
    "render_model_card",
]
