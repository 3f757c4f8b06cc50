"""Load a Hugging Face causal LM (directory, hub id or GGUF) as a blockspec target with its tokenizer."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from blockspec.errors import BlockspecError, brief
from blockspec.hub import (DEFAULT_TARGET, download_from_hub, looks_like_hub_id, model_name, resolve_local,
                           smollm2_gguf_path)
from blockspec.target.model import SUPPORTED_MODEL_TYPES, TargetModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# a decoder layer's tensor: its index (text-only and multimodal layouts)
_DECODER_LAYER = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_device(device: str | torch.device) -> str:
    """The device to run on: cpu, cuda or cuda:N ('auto': cuda when available), as a string or a torch.device.
    Anything else -- mps, meta, a missing GPU, a bare index -- is a one-line user error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):  # torch reads an int as the current accelerator's index
        raise BlockspecError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {brief(device)}")
    device = str(device)
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise BlockspecError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise BlockspecError(f"device {device!r} is not supported: blockspec runs on cpu or cuda[:N]")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BlockspecError(f"device {device!r}: CUDA is not available on this machine; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise BlockspecError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """'auto' means bf16 on CUDA and fp32 elsewhere (fp16 reportedly destroys acceptance)."""
    device = torch.device(resolve_device(device))
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise BlockspecError(f"dtype {dtype} is not a floating-point type: use auto, {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise BlockspecError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Target:
    """A target model ready for decoding: our forward, its tokenizer, and its stop tokens."""

    model: TargetModel
    tokenizer: object | None
    name: str
    eos_token_ids: tuple[int, ...] = ()
    hf_config: object = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def encode(self, prompt: str | list[dict], chat: bool = True, enable_thinking: bool | None = None,
               template_kwargs: dict | None = None) -> list[int]:
        """Token ids for a prompt: a string, or chat messages; the chat template applies when `chat`.

        `template_kwargs` are extra variables for the chat template (e.g. OpenAI's `chat_template_kwargs`).
        """
        if self.tokenizer is None:
            raise BlockspecError(f"target {self.name!r} has no tokenizer: pass token ids instead of text")
        if isinstance(prompt, str) and not chat:
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise BlockspecError(f"target {self.name!r} has no chat template: use --no-chat-template for raw text")
        kwargs = dict(template_kwargs or {})
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)


def cache_root() -> Path:
    return Path(os.environ.get("BLOCKSPEC_CACHE", Path.home() / ".cache" / "blockspec"))


def gguf_as_hf_dir(gguf: Path) -> Path:
    """A GGUF file converted once to a plain HF directory (dequantized safetensors + tokenizer), cached.

    transformers dequantizes GGUF tensors on every load (~20 s for SmolLM2-135M); the cached copy loads in
    a few seconds. The conversion goes to a temporary folder beside its destination (a rename across
    filesystems would fail) and is renamed into place, so it is never half-written; a failed conversion
    leaves nothing behind.
    """
    stat = gguf.stat()
    out = cache_root() / "gguf" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (out / "config.json").is_file():
        return out
    try:  # before the ~20 s conversion: an unwritable cache fails at once
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    except OSError as exc:
        raise BlockspecError(f"cannot write the model cache {out.parent} ({exc.strerror or exc}): set "
                             f"BLOCKSPEC_CACHE to a writable folder") from None
    print(f"blockspec: converting {gguf.name} once to {out} (dequantized)", file=sys.stderr)
    try:
        _convert_gguf(gguf, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        if not (out / "config.json").is_file():  # else another process finished the same conversion first
            reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise BlockspecError(f"converting {gguf.name} into the cache {out.parent} failed ({reason}): check the "
                                 f"free space there, or set BLOCKSPEC_CACHE to another folder") from None
    except Exception as exc:  # gguf's reader raises ValueError, struct.error, ... for a file it cannot parse
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise BlockspecError(f"cannot read {gguf.name} as a GGUF model ({reason}): pass a complete GGUF file of a "
                             f"Llama / Qwen2 / Qwen3 / Mistral model, or an HF directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    quiet_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(quiet_tqdm, disable=True)  # its bar ignores transformers' settings
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    finally:
        gguf_utils.tqdm = quiet_tqdm


def _hf_source(name: str) -> str:
    """A local HF directory (or hub snapshot) for a target name; GGUF files are converted first."""
    if name == DEFAULT_TARGET:
        return str(gguf_as_hf_dir(smollm2_gguf_path()))
    if looks_like_hub_id(name):
        return str(download_from_hub(name, ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    path = resolve_local(name, "target")
    if path.is_file():
        if path.suffix != ".gguf":
            raise BlockspecError(f"target file {name!r} is not a .gguf: pass a model directory or a GGUF file")
        return str(gguf_as_hf_dir(path))
    if (path / "config.json").is_file():
        return str(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(gguf_as_hf_dir(ggufs[0]))
    raise BlockspecError(f"target directory {name!r} has no config.json (nor a single .gguf file)")


def load_target(name: str | os.PathLike = DEFAULT_TARGET, device: str | torch.device = "cpu",
                dtype: str | torch.dtype = "auto", tokenizer: bool = True) -> Target:
    """Load a Llama / Qwen2 / Qwen3 / Mistral / Qwen3.5 causal LM from a directory, a GGUF file or a model-hub id.

    Qwen3.5 comes as the published multimodal checkpoint (transformers loads its text model: the weights under
    `model.language_model.`, without the vision tower and the MTP head) or as a text-only Qwen3_5ForCausalLM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    name = model_name(name, "target")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    # transformers prints progress bars and GGUF notes; keep the CLI's output to what the user asked for.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    source = _hf_source(name)
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise BlockspecError(f"cannot read the target config in {name!r}: {str(exc).splitlines()[0]}") from None
    except _config_validation_error() as exc:
        # "Class validation error for validator ...:" then the reason on the last line
        reason = str(exc).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
        raise BlockspecError(f"the target config.json in {name!r} is invalid ({reason[:200]}): fix config.json "
                             f"to match the checkpoint") from None
    # a draft's config.json says model_type qwen3 too; loaded as a target it would lack only embedding and head
    if getattr(hf_config, "dflash_config", None) is not None or any(
            arch.startswith(("DFlash", "QwenDFlash", "QwenDFlare")) for arch in hf_config.architectures or ()):
        raise BlockspecError(f"{name!r} is a DFlash/DFlare draft, not a target: pass it as the draft (--draft) "
                             f"and the model it was trained for as the target")
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BlockspecError(f"target model_type {hf_config.model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        # mismatched shapes are reported in `info` (checked below), not raised as a multi-line RuntimeError
        hf_model, info = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, output_loading_info=True,
                                                              ignore_mismatched_sizes=True)
    except OSError as exc:
        raise BlockspecError(f"cannot load target weights from {name!r} ({str(exc).splitlines()[0][:160]}); "
                             f"the folder needs *.safetensors weights") from None
    except json.JSONDecodeError as exc:  # a broken shard index (config.json was read above)
        raise BlockspecError(f"{_first_invalid_json(Path(source))} in {name!r} is not valid JSON ({exc.msg}, "
                             f"line {exc.lineno}): re-download or re-save the checkpoint") from None
    except SafetensorError as exc:  # a truncated download, or a file that is not safetensors at all
        reason = str(exc).splitlines()[0][:120]
        raise BlockspecError(f"the *.safetensors weights in {name!r} are unreadable ({reason}): re-download or "
                             f"re-save the checkpoint") from None
    _check_loading_info(name, info, hf_config.get_text_config().num_hidden_layers)
    model = TargetModel.from_hf(hf_model).to(device)
    del hf_model
    _check_finite(name, model)
    # transformers 5 returns an empty tokenizer for a folder without one; treat that as "no tokenizer"
    has_tokenizer = any((Path(source) / f).is_file() for f in TOKENIZER_FILES)
    tok = AutoTokenizer.from_pretrained(source) if tokenizer and has_tokenizer else None
    eos: list[int] = []
    try:
        gen = GenerationConfig.from_pretrained(source)
        eos += [gen.eos_token_id] if isinstance(gen.eos_token_id, int) else list(gen.eos_token_id or [])
    except (OSError, ValueError):
        pass
    text_config = hf_config.get_text_config()  # a multimodal config keeps its stop ids in text_config
    for candidate in (getattr(text_config, "eos_token_id", None), getattr(tok, "eos_token_id", None)):
        eos += [candidate] if isinstance(candidate, int) else list(candidate or [])
    return Target(model=model, tokenizer=tok, name=name, eos_token_ids=tuple(dict.fromkeys(eos)),
                  hf_config=hf_config)


def _first_invalid_json(folder: Path) -> str:
    """The name of the first *.json file in `folder` that does not parse (for an error message)."""
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return path.name
    return "a .json file"


def _config_validation_error() -> type[Exception]:
    """The error transformers' config dataclasses raise for an inconsistent config.json (not a ValueError)."""
    from huggingface_hub import errors as hub_errors

    return getattr(hub_errors, "StrictDataclassError", ValueError)


def _check_loading_info(name: str, info: dict, num_layers: int) -> None:
    """Refuse a checkpoint that lacks a tensor or holds one of another shape: transformers would initialise it
    randomly and only log it, leaving a target that loads fine and decodes garbage. Likewise a decoder layer past
    config.json's num_hidden_layers: transformers drops it as unexpected (other unexpected tensors, such as
    Qwen3.5's vision tower and MTP head, are dropped on purpose)."""
    extra = sorted(key for key in info.get("unexpected_keys") or ()
                   if (match := _DECODER_LAYER.match(key)) and int(match.group(1)) >= num_layers)
    if extra:
        raise BlockspecError(f"target checkpoint {name!r} holds tensor {extra[0]!r}, past config.json's "
                             f"num_hidden_layers = {num_layers}: fix num_hidden_layers to match the weights")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BlockspecError(f"target checkpoint {name!r} is missing tensor {missing[0]!r}{more}: the weights are "
                             f"incomplete (a missing shard?); re-download or re-save the checkpoint")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda entry: entry[0])
    if mismatched:
        key, found, expected = mismatched[0]
        raise BlockspecError(f"target tensor {key!r} in {name!r} has shape {list(found)}, but config.json implies "
                             f"{list(expected)}: config.json does not match the weights")


def _check_finite(name: str, model: torch.nn.Module) -> None:
    """Refuse weights holding NaN or inf (a damaged file or a broken conversion): every logit they reach is NaN, so
    greedy decoding picks token 0 and every sampled request fails. Checked on the model's device (a GPU reads the
    weights once in milliseconds)."""
    for key, weight in model.named_parameters():
        if not torch.isfinite(weight).all():
            raise BlockspecError(f"target tensor {key!r} in {name!r} holds values that are not finite (NaN or inf): "
                                 f"the checkpoint is corrupt; re-download or re-save it")


def target_from_hf(hf_model: torch.nn.Module, tokenizer: object | None = None, name: str = "in-memory") -> Target:
    """Wrap an already-loaded transformers model (tests, notebooks)."""
    eos = getattr(hf_model.config, "eos_token_id", None)
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
    return Target(model=TargetModel.from_hf(hf_model), tokenizer=tokenizer, name=name, eos_token_ids=eos_ids,
                  hf_config=hf_model.config)

