"""Vision-language models (docs/vision.md): images in preference rows, the processor and model of
a VLM, and the image tensors a batch carries to the model.

Rows are TRL's vision preference format: ``images`` (a list; ``image``, one) beside
conversational ``prompt`` / ``chosen`` / ``rejected``, the user turn holding ``{"type": "image"}``
placeholders (or plain text, the images then going before the first user turn's text, as TRL's
``prepare_multimodal_messages`` does). An image is a path relative to the data file, an HF
``Image`` feature (``{"bytes", "path"}``) or raw bytes; it is read here and kept as its file's
bytes, so the prompt of a table row is ``(prompt text, image bytes)``.

At tokenisation the processor expands the prompt's image tokens; the image files are kept beside
the tokens, and collating a batch runs the processor on the prompt and its images again for the
image tensors (``pixel_values`` and the model's other image inputs: ``pixel_attention_mask``,
``image_grid_thw``, ...), as TRL's vision collator does: the tokenised-data cache holds no pixel
tensors. A batch carries them as ``image_inputs``, a list of {name: tensor} per example; a
layout hands the model the examples' tensors concatenated along dim 0 in the order their prompts
appear in the layout's rows (``concat``). Every supported family (LLaVA, Idefics2/3, SmolVLM, Qwen2-VL) scatters image
features into the image tokens of the whole batch in row-major order, so this works for the
usual layout and for shared prompts and packed rows alike.
"""
import hashlib
import io
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from data_files import DatasetFormatError, render_chat, strip_shared_prompt

# the processor's outputs that are text, not image inputs
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# where families keep their vision encoder (LLaVA, Idefics/SmolVLM, Qwen2-VL) and projector (LLaVA,
# Idefics/SmolVLM; Qwen2-VL's is inside `visual`)
VISION_TOWERS = ("vision_tower", "vision_model", "visual")
VISION_MODULES = (*VISION_TOWERS, "multi_modal_projector", "connector")
IMAGE_TOKEN = "<image>"
IMAGE_DATA_VERSION = 1  # bump when the tokenised columns of image data change (keys their cache)
# model=tiny_vlm's chat template: HH-style turns (as the embedded tokenizer's), an image block
# rendered as the image token
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '\n\nHuman: ' }}"
    "{% elif m['role'] == 'assistant' %}{{ '\n\nAssistant: ' }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "' }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}")

_SCHEMA = ("Image rows (TRL's vision format) need 'images' (a list of image paths relative to the "
           "file, or parquet Image values) and conversational 'prompt', 'chosen', 'rejected' "
           "(lists of {role, content}; the user turn holds one {'type': 'image'} per image).")


# ----------------------------------------------------------------------------- rows

def is_image_row(row: dict) -> bool:
    return row.get("images") is not None or row.get("image") is not None


def _image_bytes(value, where: str, k: int, base_dir: Path) -> bytes:
    """One image's file bytes, checked to decode: a path (relative to base_dir), an HF Image
    feature {"bytes", "path"}, or bytes."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    name = f"image {k}"
    try:
        if isinstance(value, str):
            name = f"image {k} ({value})"
            data = (base_dir / value).read_bytes()
        elif isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        else:
            raise DatasetFormatError(f"{where}: {name} is {type(value).__name__}, not a path or "
                                     f"image bytes. {_SCHEMA}")
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except OSError as e:  # a missing file, or bytes PIL cannot decode (UnidentifiedImageError)
        reason = (f"no such file: {base_dir / value}" if isinstance(e, FileNotFoundError)
                  else "not an image file PIL can decode" if isinstance(e, UnidentifiedImageError)
                  else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise DatasetFormatError(f"{where}: {name} cannot be read ({reason}); fix or remove the row "
                                 "(image paths are relative to the data file).") from None
    return data


def row_images(row: dict, where: str, base_dir: Path) -> Tuple[bytes, ...]:
    """The row's images as file bytes (``images``, or a single ``image``)."""
    images = row["images"] if row.get("images") is not None else [row["image"]]
    if not isinstance(images, (list, tuple)):
        images = [images]
    return tuple(_image_bytes(value, where, k, base_dir) for k, value in enumerate(images, start=1))


def _blocks(messages, column: str, where: str) -> List[dict]:
    """Messages with every content a list of {type: image} / {type: text, text} blocks."""
    if not isinstance(messages, list) or not messages:
        raise DatasetFormatError(f"{where}: column '{column}' must be a non-empty list of messages. {_SCHEMA}")
    out = []
    for k, message in enumerate(messages, start=1):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        ok = (isinstance(content, list) and isinstance(message.get("role"), str) and all(
            isinstance(b, dict) and (b.get("type") == "image" or isinstance(b.get("text"), str))
            for b in content))
        if not ok:
            raise DatasetFormatError(f"{where}: column '{column}', message {k} must have a string 'role' "
                                     f"and a string or block-list 'content', got {message!r:.80}. {_SCHEMA}")
        out.append({"role": message["role"],
                    "content": [{"type": "image"} if b.get("type") == "image" else
                                {"type": "text", "text": b["text"]} for b in content]})
    return out


def _with_placeholders(prompt: List[dict], n_images: int, where: str) -> List[dict]:
    """The prompt with exactly n_images image blocks: as given, or (none given) all before the
    first user turn's text (TRL's prepare_multimodal_messages)."""
    count = sum(b["type"] == "image" for m in prompt for b in m["content"])
    if count == 0:
        user = next((m for m in prompt if m["role"] == "user"), prompt[0])
        user["content"] = [{"type": "image"}] * n_images + user["content"]
    elif count != n_images:
        raise DatasetFormatError(f"{where}: the prompt holds {count} image placeholders but the row has "
                                 f"{n_images} images; give one {{'type': 'image'}} per image.")
    return prompt


def image_row_to_text(row: dict, where: str, processor, base_dir: Path):
    """((prompt text, image bytes), chosen text, rejected text) for one vision preference row;
    the texts rendered with the processor's chat template."""
    if processor is None:
        raise DatasetFormatError(f"{where}: the row has images, and this model reads text only; train a "
                                 "vision-language model (model=tiny_vlm, or model.vision=true with a VLM).")
    images = row_images(row, where, base_dir)
    for column in ("prompt", "chosen", "rejected"):
        if column not in row:
            raise DatasetFormatError(f"{where}: missing column '{column}'. {_SCHEMA}")
    prompt = _with_placeholders(_blocks(row["prompt"], "prompt", where), len(images), where)
    texts = [render_chat(processor, prompt, strip_shared_prompt(prompt, _blocks(row[c], c, where)), where)
             for c in ("chosen", "rejected")]
    return (texts[0][0], images), texts[0][1], texts[1][1]


# ----------------------------------------------------------------------------- image tensors

def encode_prompt(processor, prompt: str, images: Sequence[bytes]) -> Tuple[List[int], Dict[str, torch.Tensor]]:
    """(prompt token ids with the image tokens expanded, the image tensors {name: tensor});
    plain token ids and {} for a prompt without images."""
    from PIL import Image
    if not images:
        return processor.tokenizer(prompt, add_special_tokens=False)["input_ids"], {}
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    out = processor(text=[prompt], images=[pictures], add_special_tokens=False, return_tensors="pt")
    tensors = {k: v for k, v in out.items() if k not in _TEXT_KEYS and torch.is_tensor(v)}
    return out["input_ids"][0].tolist(), tensors


def concat(inputs: Sequence[Dict[str, torch.Tensor]], device=None) -> Dict[str, torch.Tensor]:
    """Examples' image tensors concatenated along dim 0, zero-padded in the others (Idefics pads
    a batch's image count with all-zero images, which it skips); {} when none has images."""
    names = sorted({name for one in inputs for name in one})
    out = {}
    for name in names:
        parts = [one[name] for one in inputs if name in one]
        shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
        padded = [p.new_zeros((p.shape[0], *shape)) for p in parts]
        for pad, p in zip(padded, parts):
            pad[tuple(slice(0, n) for n in p.shape)] = p
        out[name] = torch.cat(padded).to(device) if device is not None else torch.cat(padded)
    return out


def batch_inputs(batch: Dict, order: Optional[Sequence[int]] = None, device=None) -> Dict[str, torch.Tensor]:
    """The image inputs of a forward over `batch`'s examples in `order` (default: batch order);
    {} for a batch without images."""
    if "image_inputs" not in batch:
        return {}
    examples = batch["image_inputs"]
    order = range(len(examples)) if order is None else order
    return concat([examples[i] for i in order], device)


def token_inputs(model, input_ids: torch.Tensor, image_inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per-token inputs a family needs beside the ids, derived from them: Qwen2-VL's
    mm_token_type_ids (1 at image tokens, 2 at video tokens), from which it computes its
    multimodal rotary positions. {} for other models and for rows without images."""
    import inspect
    if not image_inputs:
        return {}
    backbone = getattr(model, model.base_model_prefix, model)
    if "mm_token_type_ids" not in inspect.signature(type(backbone).forward).parameters:
        return {}
    types = (input_ids == model.config.image_token_id).long()
    video = getattr(model.config, "video_token_id", None)
    return {"mm_token_type_ids": types if video is None else types + 2 * (input_ids == video).long()}


def digest(inputs: Dict[str, torch.Tensor]) -> bytes:
    """A hash of one example's image tensors (b"" without images): keys the reference cache."""
    if not inputs:
        return b""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        h.update(name.encode() + str(tuple(inputs[name].shape)).encode())
        h.update(inputs[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


# ----------------------------------------------------------------------------- models

def build_processor(m, tokenizer):
    """(tokenizer, processor) of a vision model config `m`: a LLaVA processor built here for
    model.from_config (its image processor sized from the vision config, `tokenizer` with the
    image token added), else AutoProcessor from model.tokenizer_name_or_path or name_or_path."""
    import transformers
    if m.from_config is None:
        from utils import load_pretrained
        own = m.tokenizer_name_or_path not in (None, "embedded")
        source, option = ((m.tokenizer_name_or_path, "model.tokenizer_name_or_path") if own
                          else (m.name_or_path, "model.name_or_path"))
        processor = load_pretrained(transformers.AutoProcessor, source, option, "processor",
                                     trust_remote_code=m.trust_remote_code)
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = tokenizer.eos_token_id
        return tokenizer, processor
    vision = m.from_config.vision_config
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    size = int(vision.image_size)
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                crop_size={"height": size, "width": size})
    # "default" drops the vision tower's CLS feature: (size / patch)^2 image tokens per image
    processor = transformers.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=int(vision.patch_size),
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=TINY_CHAT_TEMPLATE)
    return tokenizer, processor


def model_config(from_config: dict, tokenizer):
    """A transformers config of a VLM from a dict: the text model's vocabulary sized to the
    tokenizer and its special tokens, the image token the tokenizer's."""
    import transformers
    settings = {k: dict(v) if isinstance(v, dict) else v for k, v in from_config.items()}
    text = settings.setdefault("text_config", {})
    text["vocab_size"] = max(int(text.get("vocab_size", 0)), len(tokenizer))
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        text.setdefault(name, getattr(tokenizer, name))
    settings.setdefault("image_token_id", tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)


def freeze(model) -> int:
    """Freeze the vision encoder (the modules VISION_TOWERS names), as LLaVA's fine-tuning and
    TRL's VLM examples do; the projector and the language model train. Returns the number of
    parameters frozen."""
    n = 0
    towers = [module for name, module in model.named_modules() if name.rpartition(".")[2] in VISION_TOWERS]
    for part in towers:
        for param in part.parameters():
            n += param.numel() if param.requires_grad else 0
            param.requires_grad_(False)
    return n


def language_model_targets(names: Sequence[str]) -> str:
    """A peft target_modules regex: modules ending in one of `names` outside the vision parts, so
    that LoRA adapts the language model only."""
    vision = "|".join(VISION_MODULES)
    return rf"^(?!.*\b({vision})\b).*\.({'|'.join(names)})$"


def processor_fingerprint(processor) -> str:
    """What in a processor changes tokenised image data (keys the tokenised-data cache)."""
    if processor is None:
        return ""
    settings = {k: getattr(processor, k, None) for k in ("patch_size", "num_additional_image_tokens",
                                                         "vision_feature_select_strategy", "image_seq_len")}
    return (f"images-v{IMAGE_DATA_VERSION}|{type(processor).__name__}|{settings}|"
            + processor.image_processor.to_json_string())


def images_keys(column: Sequence[Sequence[bytes]]) -> List[str]:
    """One hash per row of an 'images' column, for the tokenised-data cache key."""
    out = []
    for images in column:
        h = hashlib.blake2b(digest_size=16)
        for data in images:
            h.update(len(data).to_bytes(8, "little") + data)
        out.append(h.hexdigest())
    return out


# ----------------------------------------------------------------------------- a toy dataset

# the colours of write_example's pictures
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}


def colour_png(colour: str, seed: int) -> bytes:
    """A 20x24 PNG of one colour with a little noise (seeded)."""
    import numpy as np
    from PIL import Image
    noise = np.random.default_rng(seed).integers(-20, 21, (20, 24, 3))
    pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def colour_rows(n: int, image) -> List[dict]:
    """n rows of TRL's vision format asking which colour a picture is: chosen names it, rejected
    another colour; image(colour, k) gives row k's image value (a path or an Image feature)."""
    names = list(COLOURS)
    rows = []
    for k in range(n):
        colour, wrong = names[k % 4], names[(k + 1 + k // 4 % 3) % 4]
        turn = lambda role, content: [{"role": role, "content": content}]  # noqa: E731
        rows.append({"images": [image(colour, k)],
                     "prompt": turn("user", [{"type": "image"}, {"type": "text", "text": "Which colour is it?"}]),
                     "chosen": turn("assistant", [{"type": "text", "text": f" It is {colour}."}]),
                     "rejected": turn("assistant", [{"type": "text", "text": f" It is {wrong}."}])})
    return rows


def write_example(directory, n: int = 64) -> Tuple[Path, Path]:
    """A toy image preference dataset in `directory`, offline: colours.jsonl (its PNGs in images/,
    paths relative to the file) and colours.parquet (the same rows, images in an HF Image
    column). Returns the two paths."""
    import json
    import datasets
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)

    def path(colour, k):
        (directory / "images" / f"{k}.png").write_bytes(colour_png(colour, k))
        return f"images/{k}.png"
    jsonl = directory / "colours.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in colour_rows(n, path)))
    rows = colour_rows(n, lambda colour, k: {"bytes": colour_png(colour, k), "path": None})
    table = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    parquet = directory / "colours.parquet"
    table.to_parquet(str(parquet))
    return jsonl, parquet


if __name__ == "__main__":  # python vision.py DIR [N]: write the toy dataset (docs/vision.md)
    import sys
    for written in write_example(sys.argv[1], *(int(a) for a in sys.argv[2:3])):
        print(f"wrote {written}")
