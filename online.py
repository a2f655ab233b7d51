"""Online and iterative preference learning: the policy answers, a judge ranks, the loss learns.

`online.enabled=true` turns any paired loss into its online form (online DPO, Guo et al. 2024,
arXiv 2402.04792): the prompts of each batch (their dataset completions unused) are answered
`samples_per_prompt` times by the current policy, a judge from rewards.REWARDS scores every
answer, and the best and the worst answer of each prompt become its chosen and rejected response
(a prompt whose answers all score the same is a tie: dropped, and counted). The pairs are
tokenised into the batch layout preference_datasets makes, so the trainer scores them on its one
path, whatever the loss.

`generate_every=N` makes it iterative (Xiong et al. 2024, arXiv 2312.11456; Yuan et al. 2024,
arXiv 2401.10020): at the start of each round of N batches the policy, frozen for the round,
answers the prompts of all N batches at once; the round's pairs are written to
RUN/online/round-{first batch}.jsonl (prompt / chosen / rejected, the standard preference file,
plus the judge's scores), and trained on over the next N steps. A round's sampling is seeded by
the run's seed, its first batch and the rank, and its pairs are part of the checkpoint, so a
run killed mid-round resumes exactly.

Under FSDP each rank answers and judges its own share of the prompts; the pairs are then gathered,
so every rank holds the same global batch and the trainer splits it as usual.
"""
import itertools
import json
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch

import parallel
import preference_datasets
import sampling


class OfflineBatches:
    """The data's batches as they are (online.enabled=false)."""

    def wrap(self, batches: Iterable[Dict], first_batch: int) -> Iterable[Dict]:
        return batches

    def examples_in(self, batch: Dict) -> int:
        """Dataset examples a training batch stands for."""
        return len(batch["chosen_input_ids"])

    def metrics(self) -> Dict[str, float]:
        return {}

    def state(self) -> Optional[dict]:
        return None

    def load_state(self, state: Optional[dict]):
        pass


def best_and_worst(rewards: torch.Tensor):
    """(index of the best answer, of the worst, tie) for each prompt; ties: every answer of the
    prompt scores the same, so there is no preference to learn.

    Args: rewards: (P, K) the judge's rewards of K answers to each of P prompts.
    Returns: (P,) long, (P,) long, (P,) bool.
    """
    best, worst = rewards.argmax(dim=1), rewards.argmin(dim=1)
    return best, worst, rewards.max(dim=1).values == rewards.min(dim=1).values


def pair_records(prompts: List[str], prompt_rows: List[List[int]], answers: List[List[int]],
                 texts: List[str], rewards: torch.Tensor) -> List[dict]:
    """One record per untied prompt: its best answer as chosen and its worst as rejected.

    Args: the P prompts and their token ids; answers and texts: P * K, prompt-major; rewards: (P, K).
    """
    best, worst, tie = best_and_worst(rewards)
    k, records = rewards.shape[1], []
    for i, (prompt, row) in enumerate(zip(prompts, prompt_rows)):
        if tie[i]:
            continue
        c, r = i * k + int(best[i]), i * k + int(worst[i])
        records.append({"prompt": prompt, "prompt_ids": row, "chosen_ids": answers[c],
                        "rejected_ids": answers[r], "chosen": texts[c], "rejected": texts[r],
                        "chosen_score": float(rewards[i, best[i]]),
                        "rejected_score": float(rewards[i, worst[i]])})
    return records


def pairs_batch(records: List[dict], eos_id: int, pad_id: int, max_length: int,
                max_prompt_length: int) -> Dict:
    """The records as a collated preference batch (preference_datasets' layout); no records: a
    batch of no rows (the trainer makes no update for it)."""
    if not records:
        return {"chosen_input_ids": torch.zeros((0, 1), dtype=torch.long), "prompt": []}
    elements = [preference_datasets.assemble(
        r["prompt"], r["chosen"], r["rejected"], r["prompt_ids"], r["chosen_ids"], r["rejected_ids"],
        eos_id, "keep_end", max_length, max_prompt_length) for r in records]
    return preference_datasets.collate(elements, pad_id)


class OnlineBatches(OfflineBatches):
    """Batches of the policy's own answers, ranked by a judge (see the module docstring).

    Args:
        policy: the trained policy (placed; it generates in place, no copy).
        tokenizer: the run's tokenizer.
        scorer: rewards' scorer(prompts, completions) -> (N,) rewards.
        settings: the config's `online` keys, and gather: whether FSDP gathers the policy for generation.
        share: global batch -> this rank's share of it (the trainer's rank_slice), on the device.
        ranks: parallel.Ranks; each rank answers its share.
        autocast: the trainer's forward context (mixed precision).
        per_update: micro-batches x data-parallel ranks: a batch's pairs are cut to a multiple.
        lengths: (max_length, max_prompt_length).
        seed: the run's seed.
        run_dir: where round files go (iterative).
    """

    def __init__(self, policy, tokenizer, scorer: Callable, settings: dict, share: Callable, ranks,
                 autocast: Callable, per_update: int, lengths: tuple, seed: int, run_dir: Path):
        self.policy, self.tokenizer, self.scorer, self.share = policy, tokenizer, scorer, share
        self.settings, self.ranks, self.autocast = settings, ranks, autocast
        self.per_update, self.lengths, self.seed, self.run_dir = per_update, lengths, seed, run_dir
        self.round: Optional[dict] = None  # {"start": first batch index, "batches": [per batch]}
        self.last: Dict[str, float] = {}
        self.handed_at: Optional[float] = None
        self.last_examples = 0

    # -- the batches -------------------------------------------------------------------------

    def wrap(self, batches: Iterable[Dict], first_batch: int) -> Iterator[Dict]:
        """The training batches from the data's (whose first is batch `first_batch` of the
        schedule): each replaced by its prompts' pairs, answered in rounds of generate_every."""
        batches, index = iter(batches), first_batch
        if self.round is not None and self.round["start"] <= index < self.round_end():
            # resumed inside a round: its pairs came with the checkpoint; skip the data it answered
            for _ in itertools.islice(batches, self.round_end() - index):
                pass
        else:
            self.round = None
        while True:
            if self.round is None or index == self.round_end():
                chunk = list(itertools.islice(batches, self.settings["generate_every"]))
                if not chunk:
                    return
                self.round = self.answer_round(index, chunk)
            batch = self.batch_at(index)
            self.handed_at = time.perf_counter()
            yield batch
            index += 1

    def round_end(self) -> int:
        return self.round["start"] + len(self.round["batches"])

    def batch_at(self, index: int) -> Dict:
        """Batch `index` of the current round, cut to a multiple of per_update pairs; sets the
        metrics of the step about to train on it."""
        part = self.round["batches"][index - self.round["start"]]
        records = part["records"][:len(part["records"]) - len(part["records"]) % self.per_update]
        stats, n = part["stats"], max(part["stats"]["prompts"], 1)
        margins = [r["chosen_score"] - r["rejected_score"] for r in part["records"]]
        self.last = {"online/reward": stats["reward_sum"] / max(stats["answers"], 1),
                     "online/reward_margin": sum(margins) / max(len(margins), 1),
                     "online/ties": stats["ties"] / n, "online/pairs": len(records),
                     "online/prompts": stats["prompts"],
                     "online/length": stats["tokens"] / max(stats["answers"], 1),
                     "online/tokens_per_second": self.round["tokens_per_second"],
                     "time/generation": self.round["seconds"] if index == self.round["start"] else 0.0}
        self.last_examples = stats["prompts"]
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        return pairs_batch(records, eos, pad, *self.lengths)

    def examples_in(self, batch: Dict) -> int:
        return self.last_examples

    def metrics(self) -> Dict[str, float]:
        """The last step's online metrics, and the time it trained for beside its generation."""
        step = time.perf_counter() - self.handed_at if self.handed_at is not None else 0.0
        return {**self.last, "time/train_step": step}

    # -- one round -------------------------------------------------------------------------------

    def answer_round(self, start: int, chunk: List[Dict]) -> dict:
        """Answer and judge the prompts of the round's batches with the policy as it is now."""
        began = time.perf_counter()
        self.policy.eval()
        with parallel.seeded_rng(self.seed_of(start), self.ranks.device), \
                parallel.gathered_for_generation(self.policy, self.settings["gather"]) as gathered:
            mine = [self.answer(self.share(batch), synced=self.ranks.distributed and not gathered)
                    for batch in chunk]
        parts = self.ranks.gather_objects(mine)  # online refuses tensor parallelism: every rank is a data rank
        seconds = time.perf_counter() - began
        batches = [merge_shares([p[b] for p in parts]) for b in range(len(chunk))]
        tokens = sum(b["stats"]["tokens"] for b in batches)
        result = {"start": start, "batches": batches, "seconds": seconds,
                  "tokens_per_second": tokens / seconds if seconds > 0 else 0.0}
        if self.settings["generate_every"] > 1 and self.ranks.rank == 0:
            write_round(self.run_dir / "online" / f"round-{start:06d}.jsonl", start, batches)
        return result

    def seed_of(self, start: int) -> int:
        """The round's sampling seed: the run's, the round's first batch and the rank."""
        return (self.seed * 1_000_003 + start) * 1_009 + self.ranks.rank

    def answer(self, batch: Dict, synced: bool) -> dict:
        """This rank's share of one batch: K answers per prompt, judged and paired. synced: the
        policy is sharded and not gathered, so every rank runs as many forwards as the longest."""
        k, s = self.settings["samples_per_prompt"], self.settings
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_input_ids"],
                                                               batch["prompt_attention_mask"])]
        generation = dict(temperature=float(s["temperature"]), top_p=float(s["top_p"]),
                          max_new_tokens=s["max_new_tokens"])
        with self.autocast():
            answers = sampling.sample_token_ids(
                self.policy, self.tokenizer, rows, k, generation, len(rows) * k, self.ranks.device,
                synced_gpus=synced, progress=False)
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        prompts = list(batch["prompt"])
        rewards = self.scorer([p for p in prompts for _ in range(k)], texts).view(len(rows), k)
        records = pair_records(prompts, rows, answers, texts, rewards.double().cpu())
        stats = {"prompts": len(rows), "answers": len(answers), "ties": len(rows) - len(records),
                 "reward_sum": float(rewards.sum()), "tokens": sum(len(a) for a in answers)}
        return {"records": records, "stats": stats}

    # -- checkpoints -----------------------------------------------------------------------------

    def state(self) -> Optional[dict]:
        """The current round (its pairs, its first batch), saved with every checkpoint."""
        return self.round

    def load_state(self, state: Optional[dict]):
        self.round = state


def merge_shares(shares: List[dict]) -> dict:
    """One batch's records and stats from every rank's share, in rank order."""
    stats = {key: sum(s["stats"][key] for s in shares) for key in shares[0]["stats"]}
    return {"records": [r for s in shares for r in s["records"]], "stats": stats}


def write_round(path: Path, start: int, batches: List[dict]):
    """A round's pairs as a preference file: prompt / chosen / rejected (the responses alone, as
    a user's file holds them), the judge's scores and the batch index they trained in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for offset, part in enumerate(batches):
            for r in part["records"]:
                f.write(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"],
                                    "rejected": r["rejected"], "chosen_score": r["chosen_score"],
                                    "rejected_score": r["rejected_score"],
                                    "batch": start + offset}) + "\n")
    tmp.replace(path)
