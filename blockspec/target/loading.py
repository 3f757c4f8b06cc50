"""Load a Hugging Face causal LM (directory, hub id or GGUF) as a blockspec target with its tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from blockspec.errors import BlockspecError
from blockspec.hub import DEFAULT_TARGET, download_from_hub, looks_like_hub_id, resolve_local, smollm2_gguf_path
from blockspec.target.model import SUPPORTED_MODEL_TYPES, TargetModel

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """'auto' means bf16 on CUDA and fp32 elsewhere (fp16 reportedly destroys acceptance)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
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

    def encode(self, prompt: str | list[dict], chat: bool = True, enable_thinking: bool | None = None) -> list[int]:
        """Token ids for a prompt: a string, or chat messages; the chat template applies when `chat`."""
        if self.tokenizer is None:
            raise BlockspecError(f"target {self.name!r} has no tokenizer: pass token ids instead of text")
        if isinstance(prompt, str) and not chat:
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise BlockspecError(f"target {self.name!r} has no chat template: use --no-chat-template for raw text")
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)


def _hf_sources(name: str) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs) for a target name."""
    if name == DEFAULT_TARGET:
        gguf = smollm2_gguf_path()
        return str(gguf.parent), {"gguf_file": gguf.name}
    if looks_like_hub_id(name):
        return str(download_from_hub(name, ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])), {}
    path = resolve_local(name, "target")
    if path.is_file():
        if path.suffix != ".gguf":
            raise BlockspecError(f"target file {name!r} is not a .gguf: pass a model directory or a GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    if (path / "config.json").is_file():
        return str(path), {}
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(path), {"gguf_file": ggufs[0].name}
    raise BlockspecError(f"target directory {name!r} has no config.json (nor a single .gguf file)")


def load_target(name: str = DEFAULT_TARGET, device: str | torch.device = "cpu",
                dtype: str | torch.dtype = "auto", tokenizer: bool = True) -> Target:
    """Load a Llama / Qwen2 / Qwen3 / Mistral causal LM from a directory, a GGUF file or a model-hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch_dtype = resolve_dtype(dtype, device)
    source, kwargs = _hf_sources(name)
    try:
        hf_config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise BlockspecError(f"cannot read the target config in {name!r}: {str(exc).splitlines()[0]}") from None
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BlockspecError(f"target model_type {hf_config.model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    # transformers logs progress bars and GGUF notes at INFO/WARNING; keep the CLI output clean.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    model = TargetModel.from_hf(hf_model).to(device)
    del hf_model
    tok = AutoTokenizer.from_pretrained(source, **kwargs) if tokenizer else None
    eos: list[int] = []
    try:
        gen = GenerationConfig.from_pretrained(source, **kwargs)
        eos += [gen.eos_token_id] if isinstance(gen.eos_token_id, int) else list(gen.eos_token_id or [])
    except (OSError, ValueError):
        pass
    for candidate in (getattr(hf_config, "eos_token_id", None), getattr(tok, "eos_token_id", None)):
        eos += [candidate] if isinstance(candidate, int) else list(candidate or [])
    return Target(model=model, tokenizer=tok, name=name, eos_token_ids=tuple(dict.fromkeys(eos)),
                  hf_config=hf_config)


def target_from_hf(hf_model: torch.nn.Module, tokenizer: object | None = None, name: str = "in-memory") -> Target:
    """Wrap an already-loaded transformers model (tests, notebooks)."""
    eos = getattr(hf_model.config, "eos_token_id", None)
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
    return Target(model=TargetModel.from_hf(hf_model), tokenizer=tokenizer, name=name, eos_token_ids=eos_ids,
                  hf_config=hf_model.config)

