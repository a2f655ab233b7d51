"""Vision-language preference training (vision.py, docs/vision.md): the tiny VLM preset, images
reaching the model through the one scoring path, image datasets, training from the command line."""
import io

import numpy as np
import pytest
import torch

import packing
import train
import vision
from conftest import compose
from utils import ConfigError


def image_bytes(seed: int, size=(20, 24)) -> bytes:
    """A small random RGB PNG (distinct per seed)."""
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny_vlm():
    """(config, tokenizer, processor, policy, reference) of model=tiny_vlm, built as train.py builds them."""
    config = compose(["model=tiny_vlm", "loss=dpo", "loss.beta=0.1"])
    tokenizer, processor = train.build_tokenizer(config.model)
    policy, reference = train.build_models(config, tokenizer)
    return config, tokenizer, processor, policy, reference


def pair_batch(tokenizer, processor, images, prompt="Describe the picture.", chosen=" A cat.",
               rejected=" A dog.", longer=()):
    """A collated batch of one pair per image list, the same texts in every row but for
    `longer[i]` more words in row i's chosen response."""
    import preference_datasets
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        tokenize=False, add_generation_prompt=True)
    elements = []
    for i, pictures in enumerate(images):
        ids = vision.encode_prompt(processor, rendered, pictures)[0]
        words = chosen + " It sits." * (longer[i] if i < len(longer) else 0)
        c_ids, r_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (words, rejected))
        element = preference_datasets.assemble(rendered, chosen, rejected, ids, c_ids, r_ids,
                                                tokenizer.eos_token_id, "keep_end", 128, 64, keep_prompt=True)
        elements.append(dict(element, images=pictures))
    return preference_datasets.collate(elements, tokenizer.pad_token_id, processor)


def test_tiny_vlm_preset_builds_a_llava_with_a_frozen_vision_encoder(tiny_vlm):
    _, tokenizer, processor, policy, reference = tiny_vlm
    assert type(policy).__name__ == "LlavaForConditionalGeneration"
    assert policy.config.image_token_id == tokenizer.convert_tokens_to_ids(vision.IMAGE_TOKEN)
    frozen = {n for n, p in policy.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in policy.named_parameters() if "vision_tower" in n}  # the projector trains
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    # 16x16 images, 8x8 patches: 4 image tokens per image in the prompt
    ids, tensors = vision.encode_prompt(processor, "look: <image>", [image_bytes(0)])
    assert ids.count(policy.config.image_token_id) == 4
    assert tensors["pixel_values"].shape == (1, 3, 16, 16)


def test_the_same_text_with_other_images_scores_differently(tiny_vlm):
    """The images reach the model on the one path (Layout -> model_logps): the same tokens with
    two different images give different log-probs; the same images, the same log-probs in the
    usual layout and with the prompt shared and pairs packed, where packing puts the longest
    pair first (the images follow their prompts into the packed rows)."""
    _, tokenizer, processor, policy, _ = tiny_vlm
    batch = pair_batch(tokenizer, processor, [[image_bytes(1)], [image_bytes(2)], [image_bytes(1)],
                                              [image_bytes(3)]], longer=(0, 0, 0, 2))
    assert torch.equal(batch["chosen_input_ids"][0], batch["chosen_input_ids"][1])
    layout = packing.build_layout(batch, ("chosen", "rejected"), True, True, 200)
    assert layout.input_ids.shape[0] == 1  # every pair in one row, the longest (pair 3) first
    assert torch.equal(layout.image_inputs["pixel_values"][0], batch["image_inputs"][3]["pixel_values"][0])
    with torch.no_grad():
        usual = {side: packing.model_logps(policy, packing.plain_layout(batch, side), False, 64)[side].logps
                 for side in ("chosen", "rejected")}
        packed = packing.model_logps(policy, layout, False, 64)
    for side in ("chosen", "rejected"):
        assert (usual[side][0] - usual[side][1]).abs() > 1e-3  # the image changes the response's logps
        assert torch.allclose(usual[side][0], usual[side][2], atol=1e-5)
        # float32 sums of ~5 tokens: rounding of differently shaped matmuls stays far below 1e-4
        torch.testing.assert_close(packed[side].logps, usual[side], atol=1e-4, rtol=0)



def write_jsonl(directory, n=32):
    """A JSON Lines file whose images are PNG paths relative to it (vision.write_example)."""
    return vision.write_example(directory, n)[0]


def write_parquet(directory, n=32):
    """A parquet file with a Hugging Face Image feature column (bytes), as datasets writes it."""
    return vision.write_example(directory, n)[1]

# ----------------------------------------------------------------------------- data


def test_parquet_and_jsonl_images_give_the_same_batches(tiny_vlm, tmp_path):
    """An HF Image column (bytes) and JSONL paths relative to the file read the same pixels; the
    prompt's image tokens are expanded and each example carries its image tensors."""
    import preference_datasets
    _, tokenizer, processor, _, _ = tiny_vlm
    batches = [next(preference_datasets.get_batch_iterator(
        [str(path)], tokenizer, batch_size=4, n_epochs=1, shuffle=False, silent=True,
        processor=processor)) for path in (write_parquet(tmp_path, 8), write_jsonl(tmp_path, 8))]
    for key in ("chosen_input_ids", "rejected_labels", "prompt_input_ids"):
        assert torch.equal(batches[0][key], batches[1][key])
    image_token = tokenizer.convert_tokens_to_ids(vision.IMAGE_TOKEN)
    assert ((batches[0]["prompt_input_ids"] == image_token).sum(1) == 4).all()
    for a, b in zip(batches[0]["image_inputs"], batches[1]["image_inputs"]):
        assert a["pixel_values"].shape == (1, 3, 16, 16) and torch.equal(a["pixel_values"], b["pixel_values"])
    tokenized, _ = preference_datasets._load_tokenized([str(tmp_path / "colours.jsonl")], tokenizer, "train", False,
                                                       128, 64, True, None, None, processor=processor)
    assert "images" in tokenized.column_names and "image_inputs" not in tokenized.column_names  # files, not pixels
    # rows differing in their image only stay apart (the prompt key holds the images)
    assert len({p.tobytes() for p in (e["pixel_values"].numpy() for e in batches[0]["image_inputs"])}) == 4


def test_bad_images_are_refused_in_one_line(tiny_vlm, tmp_path):
    """A corrupt image, a missing image file, too few placeholders and a text-only model: one line
    naming the file and row."""
    import json
    import preference_datasets
    _, tokenizer, processor, _, _ = tiny_vlm
    path = write_jsonl(tmp_path, 4)
    (tmp_path / "images" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = path.read_text().splitlines()
    missing = json.loads(lines[1]) | {"images": ["images/nowhere.png"]}
    two = json.loads(lines[0]) | {"images": ["images/0.png", "images/1.png"]}
    cases = [(lines, processor, f"{path}, line 3: image 1 (images/2.png) cannot be read (not an image file PIL "
                                "can decode); fix or remove the row"),
             ([lines[0], json.dumps(missing)], processor,
              f"{path}, line 2: image 1 (images/nowhere.png) cannot be read (no such file: "
              f"{tmp_path / 'images' / 'nowhere.png'})"),
             ([json.dumps(two)], processor, f"{path}, line 1: the prompt holds 1 image placeholders but the row "
                                            "has 2 images"),
             (lines[:1], None, f"{path}, line 1: the row has images, and this model reads text only")]
    for rows, proc, expected in cases:
        path.write_text("\n".join(rows) + "\n")
        with pytest.raises(preference_datasets.DatasetFormatError) as error:
            preference_datasets.get_dataset(str(path), "train", silent=True, tokenizer=tokenizer, processor=proc)
        assert str(error.value).startswith(expected) and "\n" not in str(error.value), str(error.value)
    import datasets  # a parquet Image column with damaged bytes in its second row
    rows = vision.colour_rows(2, lambda colour, k: {"bytes": b"junk" if k else vision.colour_png(colour, k),
                                                    "path": None})
    parquet = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image())).to_parquet(parquet)
    with pytest.raises(preference_datasets.DatasetFormatError, match=f"^{parquet}, row 2: image 1 cannot be read "
                       r"\(not an image file PIL can decode\)"):
        preference_datasets.get_dataset(str(parquet), "train", silent=True, tokenizer=tokenizer, processor=processor)


def test_bad_vision_settings_are_refused_in_one_line(tmp_path):
    from omegaconf import OmegaConf
    cases = [(["trainer=TensorParallelTrainer"], "model.vision=true with trainer=TensorParallelTrainer is not "
              "supported (its plans shard language models only); use BasicTrainer or FSDPTrainer"),
             (["model.from_config.model_type=idefics3"], "model.vision=true with model.from_config.model_type="
              "idefics3: a processor is built from a config for llava only"),
             (["model.freeze_vision=maybe"], "model.freeze_vision='maybe' must be true or false")]
    for overrides, expected in cases:
        config = compose(["model=tiny_vlm", f"local_run_dir={tmp_path}/run", *overrides])
        OmegaConf.resolve(config)
        with pytest.raises(train.ConfigError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
            train.validate_config(config, 2 if "Tensor" in overrides[0] else 1)


def test_a_prompt_with_images_is_never_cut(tiny_vlm, tmp_path):
    """Responses are cut to fit max_length; a prompt too long for any response is refused."""
    import preference_datasets
    _, tokenizer, processor, _, _ = tiny_vlm
    path = str(write_jsonl(tmp_path, 4))
    kwargs = dict(batch_size=4, n_epochs=1, shuffle=False, silent=True, processor=processor)
    batch = next(preference_datasets.get_batch_iterator([path], tokenizer, max_length=30,
                                                        max_prompt_length=8, **kwargs))
    assert batch["prompt_attention_mask"].sum(1).tolist() == [27] * 4  # whole, 4 image tokens included
    assert batch["chosen_attention_mask"].sum(1).max() == 30 and batch["response_truncated"] == [1] * 4
    with pytest.raises(preference_datasets.DatasetFormatError, match="a prompt with images takes 27 tokens"):
        preference_datasets.get_batch_iterator([path], tokenizer, max_length=20, max_prompt_length=8, **kwargs)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    """DPO on model=tiny_vlm from the command line, on a parquet and a JSONL image dataset mixed."""
    from conftest import run_subprocess
    data = tmp_path_factory.mktemp("vlm-data")
    run_dir = tmp_path_factory.mktemp("vlm-run") / "run"
    args = ["model=tiny_vlm", "loss=dpo", "loss.beta=0.1", f"local_run_dir={run_dir}",
            f"datasets=[{write_parquet(data)},{write_jsonl(data)}]", "n_examples=64", "eval_every=64",
            "n_eval_examples=16", "lr=1e-3"]
    result = run_subprocess(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_dpo_trains_the_tiny_vlm_from_the_command_line(vlm_run):
    from conftest import read_metrics
    run_dir, result = vlm_run
    evals = [row for row in read_metrics(run_dir) if "loss/eval" in row]
    assert evals[0]["loss/eval"] == pytest.approx(np.log(2), abs=1e-6)  # policy = reference at the start
    assert evals[-1]["loss/eval"] < evals[0]["loss/eval"] - 0.02
    assert "vision parameters frozen" in result.stdout
    assert "share_prompt/packing are off" not in result.stdout + result.stderr  # the layout took the images
    samples = (run_dir / "samples.jsonl").read_text().splitlines()
    assert samples and "<image>" in samples[0]


def test_the_exported_model_loads_with_its_processor(vlm_run):
    """LATEST/ is a Hugging Face model directory: AutoModelForImageTextToText and AutoProcessor
    load it, with the trained weights, and it scores an image prompt."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from safetensors.torch import load_file
    run_dir, _ = vlm_run
    model = AutoModelForImageTextToText.from_pretrained(run_dir / "LATEST")
    processor = AutoProcessor.from_pretrained(run_dir / "LATEST")
    trained = torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    assert load_file(run_dir / "LATEST" / "model.safetensors").keys() <= state.keys()
    from PIL import Image
    inputs = processor(text=["\n\nHuman: <image>Which colour is it?\n\nAssistant:"],
                       images=[[Image.open(io.BytesIO(vision.colour_png("red", 0)))]], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def vlm_trainer(overrides, tmp_path):
    """A BasicTrainer of model=tiny_vlm on a JSONL image dataset, built as train.py builds it."""
    import trainers
    from omegaconf import OmegaConf
    loss = [] if any(o.startswith("loss=") for o in overrides) else ["loss=dpo", "loss.beta=0.1"]
    config = compose(["model=tiny_vlm", *loss, f"local_run_dir={tmp_path}/run",
                      f"datasets=[{write_jsonl(tmp_path / 'data', 16)}]", "sample_during_eval=false",
                      *overrides])
    OmegaConf.resolve(config)
    train.validate_config(config, 1)
    tokenizer, processor = train.build_tokenizer(config.model)
    policy, reference = train.build_models(config, tokenizer)
    trainer = trainers.BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference,
                                    tokenizer=tokenizer, processor=processor)
    trainer.build_optimizer()
    return trainer


def test_lora_adapts_the_language_model_only(tmp_path):
    """lora.target_modules=null on a VLM: peft's projections of the language model, none in the
    vision tower (whose CLIP layers have q_proj/v_proj too); the adapter-off reference sees the
    images, and only the adapter moves."""
    trainer = vlm_trainer(["lora.r=4", "lora.alpha=8", "lr=1e-2"], tmp_path)
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and "language_model" in n for n in trainable)
    assert any("vision_tower" in n and "q_proj" in n for n, _ in trainer.policy.named_parameters())
    assert {n.rpartition(".lora_")[0].rpartition(".")[2] for n in trainable} == {"q_proj", "v_proj"}
    base = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    batch = trainer.rank_slice(trainer.eval_batches[0], 0, 1)
    before = trainer.reference.sequence_logps(batch, "chosen", average=False)
    trainer.train_step(next(trainer.train_iterator()))
    assert all(torch.equal(p, base[n]) for n, p in trainer.policy.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(trainer.reference.sequence_logps(batch, "chosen", average=False), before,
                               rtol=0, atol=1e-5)  # the reference is the untouched base
    with torch.no_grad():
        policy = packing.model_logps(trainer.policy, packing.plain_layout(batch, "chosen"), False, 64)
    assert (policy["chosen"].logps - before).abs().max() > 1e-4


def test_the_reference_cache_keys_on_the_images(tiny_vlm):
    """precompute_ref_log_probs: the same tokens with other images are another cache entry."""
    import ref_cache
    _, tokenizer, processor, _, _ = tiny_vlm
    batch = pair_batch(tokenizer, processor, [[image_bytes(1)], [image_bytes(2)], [image_bytes(1)]])
    for side in ("chosen", "rejected"):
        keys = ref_cache.sequence_keys(batch, side)
        assert keys[0] != keys[1] and keys[0] == keys[2]


def test_precomputed_reference_log_probs_are_scored_with_the_images(tmp_path):
    """The cache holds what the live reference gives with each row's images (the same weights:
    the same seed builds them)."""
    cached = vlm_trainer(["precompute_ref_log_probs=true"], tmp_path / "cached")
    cached.prepare_reference()
    live = vlm_trainer([], tmp_path / "live")
    batch = live.rank_slice(live.eval_batches[0], 0, 1)
    # rows 0 and 4 of the toy data: the same chosen tokens ("It is red."), other red pictures
    assert torch.equal(batch["chosen_input_ids"][0], batch["chosen_input_ids"][4])
    for side in ("chosen", "rejected"):
        want = live.reference.sequence_logps(batch, side, average=False)
        assert side == "rejected" or (want[0] - want[4]).abs() > 1e-6
        torch.testing.assert_close(cached.reference.sequence_logps(batch, side, average=False), want,
                                   rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fsdp_two_processes_equal_basic(tmp_path):
    """FSDP over 2 gloo processes trains the tiny VLM as one BasicTrainer process does: the image
    inputs follow each rank's rows, the frozen vision tower sits in the root shard group."""
    from conftest import run_in_process
    from test_distributed import LOSS_RTOL_FP32, WEIGHT_ATOL, assert_same_losses, max_weight_diff, torchrun
    args = ["model=tiny_vlm", "loss=dpo", "loss.beta=0.1", f"datasets=[{write_jsonl(tmp_path / 'data', 32)}]",
            "n_examples=32", "batch_size=8", "gradient_accumulation_steps=2", "eval_batch_size=8",
            "n_eval_examples=8", "eval_every=16", "sample_during_eval=false", "max_grad_norm=0.2",
            "warmup_steps=0", "minimum_log_interval_secs=0"]
    basic = run_in_process([*args, f"local_run_dir={tmp_path}/basic"])
    rc, output = torchrun(["train.py", *args, "trainer=FSDPTrainer", f"local_run_dir={tmp_path}/fsdp"], tmp_path)
    assert rc == 0, output[-4000:]
    assert_same_losses(tmp_path / "fsdp", basic, LOSS_RTOL_FP32)
    a, b = (torch.load(run / "LATEST" / "policy.pt", weights_only=True)["state"] for run in (basic, tmp_path / "fsdp"))
    assert max_weight_diff(a, b) <= WEIGHT_ATOL


def test_evaluate_samples_and_scores_with_the_images(vlm_run, tmp_path, monkeypatch):
    """evaluate.py on the VLM run: prompts of the same text with other images stay distinct, and
    generation and the implicit reward's scoring get each prompt's images."""
    import evaluate
    import sampling
    from hydra import compose as hydra_compose, initialize_config_dir
    from conftest import ROOT
    run_dir, _ = vlm_run
    seen = []
    generate = sampling.sample_token_ids
    monkeypatch.setattr(sampling, "sample_token_ids",
                        lambda *args, **kwargs: seen.append(kwargs["images"]) or generate(*args, **kwargs))
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        cfg = hydra_compose("evaluate", overrides=[f"checkpoint={run_dir / 'LATEST'}", "reward=implicit",
                                                   "n_prompts=4", "n_samples=2", "max_new_tokens=4",
                                                   f"out={tmp_path / 'eval.json'}"])
    results = evaluate.evaluate(cfg)
    assert results["n_prompts"] == 4 and results["implicit_accuracy"]["n"] == 4
    assert len(seen) == 2 and all(len(images) == 4 and images[0]["pixel_values"].shape == (1, 3, 16, 16)
                                  for images in seen)
    # the run's own evaluation of the same pairs (summed log-probs; beta does not change the sign)
    assert results["implicit_accuracy"]["mean"] >= 0.75


def test_export_hf_writes_the_vlm_with_its_processor(vlm_run, tmp_path):
    import export_hf
    from transformers import AutoModelForImageTextToText, AutoProcessor
    run_dir, _ = vlm_run
    out = export_hf.export(str(run_dir), str(tmp_path / "hf"))
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert AutoProcessor.from_pretrained(out).image_token == vision.IMAGE_TOKEN
    trained = torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


@pytest.mark.parametrize("loss", ["ipo", "tdpo", "kto", "orpo", "simpo", "bco_pair", "sft"])
def test_every_kind_of_loss_trains_on_images(loss, tmp_path):
    """A reference-based, a token-level (TDPO: per-token KL on the layout), an unpaired (KTO), a
    prompt-NLL (ORPO: the prompts' own forward), a reference-free and an SFT loss: one step each,
    on the shared-prompt packed layout the start-up check kept for the images."""
    trainer = vlm_trainer([f"loss={loss}"], tmp_path)
    assert trainer.uses_layout
    metrics = trainer.train_step(next(trainer.train_iterator()))
    assert np.isfinite(metrics["loss/train"]) and metrics["grad_norm"] > 0


def test_idefics3_images_of_any_count_follow_their_prompts(tokenizer):
    """SmolVLM's architecture (Idefics3, tiny, from a config, with a local processor): examples
    with one and with two images (padded with all-zero images, which Idefics3 skips) score the
    same in the usual layout and packed, and their images change the log-probs."""
    import copy
    import transformers
    import preference_datasets
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>"]})
    images = transformers.Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                                    max_image_size={"longest_edge": 32})
    processor = transformers.Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4)
    config = transformers.AutoConfig.for_model(
        "idefics3", scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
        text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tok)},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8})
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    elements = []
    for k, pictures in enumerate([[image_bytes(1)], [image_bytes(2)], [image_bytes(3), image_bytes(4)]]):
        prompt = "\n\nHuman: " + "<image>" * len(pictures) + "Describe.\n\nAssistant:"
        ids = vision.encode_prompt(processor, prompt, pictures)[0]
        chosen, rejected = (tok(t, add_special_tokens=False)["input_ids"] for t in (" A cat." + " Yes." * k, " A dog."))
        element = preference_datasets.assemble(prompt, "", "", ids, chosen, rejected, tok.eos_token_id,
                                                "keep_end", 256, 128, keep_prompt=True)
        elements.append(dict(element, images=pictures))
    batch = preference_datasets.collate(elements, tok.pad_token_id, processor)
    assert vision.batch_inputs(batch)["pixel_values"].shape == (3, 2, 3, 32, 32)
    with torch.no_grad():
        usual = {side: packing.model_logps(model, packing.plain_layout(batch, side), False, 64)[side].logps
                 for side in ("chosen", "rejected")}
        packed = packing.model_logps(model, packing.build_layout(batch, ("chosen", "rejected"), True, True, 512),
                                     False, 64)
    assert (usual["rejected"][0] - usual["rejected"][1]).abs() > 1e-4  # same tokens, other image
    for side in usual:  # float32 sums of a few tokens: far below 1e-4 whatever the rounding
        torch.testing.assert_close(packed[side].logps, usual[side], atol=1e-4, rtol=0)


def test_qwen2_vl_takes_its_token_types_and_the_usual_layout(tokenizer, capsys):
    """Qwen2-VL (tiny, from a config): its image_grid_thw travels with pixel_values, its
    mm_token_type_ids are derived from the ids (vision.token_inputs), and as it computes M-RoPE
    positions itself, the start-up check keeps the usual layout with one line saying why. (Its
    processor needs torchvision, absent here: the prompt ids are built by hand.)"""
    import copy
    import transformers
    import preference_datasets
    import scoring
    import utils
    from PIL import Image
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]})
    token = tok.convert_tokens_to_ids
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8,
                                                   merge_size=2, temporal_patch_size=2)
    config = transformers.AutoConfig.for_model(
        "qwen2_vl", image_token_id=token("<|image_pad|>"), vision_start_token_id=token("<|vision_start|>"),
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tok), "bos_token_id": 0, "eos_token_id": 0,
                     "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "patch_size": 8,
                       "spatial_merge_size": 2, "temporal_patch_size": 2})
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    elements, tensors = [], []
    for seed in (1, 2, 1):
        pixels = images(images=[Image.open(io.BytesIO(image_bytes(seed))).convert("RGB")], return_tensors="pt")
        n = int(pixels["image_grid_thw"].prod()) // 4  # patches merged 2x2 into one token
        text = [token("<|vision_start|>")] + [token("<|image_pad|>")] * n + [token("<|vision_end|>")]
        prompt = tok("\n\nHuman: Describe.", add_special_tokens=False)["input_ids"] + text
        chosen, rejected = (tok(t, add_special_tokens=False)["input_ids"] for t in (" A cat.", " A dog."))
        element = preference_datasets.assemble("", "", "", prompt, chosen, rejected, tok.eos_token_id,
                                                "keep_end", 256, 128, keep_prompt=True)
        elements.append(element)
        tensors.append({k: torch.as_tensor(v) for k, v in pixels.items()})
    batch = dict(preference_datasets.collate(elements, tok.pad_token_id), image_inputs=tensors)
    with torch.no_grad():
        logps = packing.model_logps(model, packing.plain_layout(batch, "chosen"), False, 64)["chosen"].logps
    assert (logps[0] - logps[1]).abs() > 1e-4 and torch.allclose(logps[0], logps[2], atol=1e-5)
    build = lambda b: packing.build_layout(b, ("chosen", "rejected"), True, True, None)  # noqa: E731
    assert not scoring.check_layout(model, None, utils.call, batch, ("chosen", "rejected"), build, 256, 64,
                                    lambda bad: bad, False)
    assert "share_prompt/packing are off: the policy cannot take it: its image tokens take multimodal rotary " \
           "positions (M-RoPE)" in capsys.readouterr().out


def test_a_turn_ending_in_eos_gets_no_second_one(tiny_vlm):
    """Rendered with a processor whose template ends each turn with EOS and a newline (as
    SmolVLM's ends it with <end_of_utterance>), the response ends at its EOS: none is added."""
    import copy
    import data_files
    _, tokenizer, processor, _, _ = tiny_vlm
    processor = copy.deepcopy(processor)
    processor.chat_template = vision.TINY_CHAT_TEMPLATE.replace(
        "{% endfor %}{% endif %}{% endfor %}", "{% endfor %}{% endif %}" + tokenizer.eos_token + "\n{% endfor %}")
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}]
    reply = [{"role": "assistant", "content": [{"type": "text", "text": " Red."}]}]
    assert data_files.render_chat(processor, prompt, reply, "row")[1] == "  Red." + tokenizer.eos_token


def test_a_vlm_whose_attention_mask_depends_on_token_types_is_refused_in_one_line(tmp_path, tokenizer):
    """PaliGemma attends both ways over its image and prompt tokens (token_type_ids shape its
    mask); trained through the causal layouts here it would learn on the wrong mask, so it is refused
    when it loads."""
    import transformers
    import utils
    config = transformers.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8),
        text_config=dict(model_type="gemma", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=len(tokenizer)),
        image_token_index=len(tokenizer) - 1, projection_dim=16)
    transformers.PaliGemmaForConditionalGeneration(config).save_pretrained(tmp_path / "paligemma")
    with pytest.raises(ConfigError) as error:
        utils.build_model(str(tmp_path / "paligemma"), None, tokenizer, torch.float32, vision=True)
    assert "paligemma attends bidirectionally" in str(error.value) and "\n" not in str(error.value)
