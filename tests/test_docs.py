"""The documentation stays short, self-contained and true to the code.

README.md is an index (<= 300 lines); the details live in docs/*.md. Every relative link resolves
to a file of the repository, no page points outside it (a user's clone has no ../shared), every
loss config is documented in docs/losses.md, and the HH sample the offline example trains on is
shipped and reads with the project's HH loader.
"""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
         ROOT / "examples" / "hh_sample" / "README.md"]
HH_SAMPLE = ROOT / "examples" / "hh_sample"
# [text](target) and ![alt](target); the target ends at the first space or ')'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(page: Path):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor of the same page
        yield target.split("#", 1)[0]


def test_readme_is_at_most_300_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move details to docs/"


def test_the_pages_exist():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"losses.md", "data.md", "distributed.md", "models.md", "evaluation.md", "performance.md",
            "troubleshooting.md", "real-model.md", "frontier.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_of_the_repository(page):
    missing = []
    for target in _relative_links(page):
        path = (page.parent / target).resolve()
        if not path.exists() or ROOT not in path.parents:
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files: {missing}"


def test_no_page_or_config_comment_points_outside_the_repository():
    texts = [*PAGES, *sorted((ROOT / "config").rglob("*.yaml"))]
    found = [f"{p.relative_to(ROOT)}: {m}" for p in texts
             for m in re.findall(r"\.\./shared|/work/", p.read_text(encoding="utf-8"))]
    assert not found, found


def test_every_loss_config_is_in_the_losses_page():
    losses_page = (ROOT / "docs" / "losses.md").read_text(encoding="utf-8")
    missing = []
    for config in sorted((ROOT / "config" / "loss").glob("*.yaml")):
        name = re.search(r"^name:\s*(\S+)", config.read_text(encoding="utf-8"), re.M).group(1)
        if f"loss={name}" not in losses_page and f"`{name}`" not in losses_page:
            missing.append(name)
    assert not missing, f"config/loss names missing from docs/losses.md: {missing}"


def test_the_hh_sample_is_shipped_and_reads_with_the_hh_loader():
    from preference_datasets import ASSISTANT_MARKER, get_dataset
    rows = {split: (HH_SAMPLE / f"helpful-base-sample-{split}.jsonl").read_text(encoding="utf-8").splitlines()
            for split in ("train", "test")}
    assert (len(rows["train"]), len(rows["test"])) == (80, 20)
    assert "MIT" in (HH_SAMPLE / "README.md").read_text(encoding="utf-8")
    kept = {}
    for split in ("train", "test"):
        data = get_dataset("hh", split, silent=True, path=str(HH_SAMPLE))
        assert all(prompt.endswith(ASSISTANT_MARKER) for prompt in data)
        kept[split] = sum(len(entry["pairs"]) for entry in data.values())
    # the two train rows whose chosen equals rejected give no pair (examples/hh_sample/README.md)
    assert kept == {"train": 78, "test": 20}


def _evaluate_settings(page: Path) -> dict:
    """key=value settings of the first `python evaluate.py` command of a page."""
    line = next(line for line in page.read_text(encoding="utf-8").splitlines()
                if line.strip().startswith("python evaluate.py"))
    return dict(arg.split("=", 1) for arg in shlex.split(line.strip())[2:] if "=" in arg)


def test_the_evaluation_example_uses_the_frontier_settings():
    """So that its numbers can be compared with the frontier table's without a hidden difference."""
    example = _evaluate_settings(ROOT / "docs" / "evaluation.md")
    frontier = _evaluate_settings(ROOT / "docs" / "frontier.md")
    for key in ("reward", "n_prompts", "n_samples", "max_new_tokens", "seed"):
        assert example.get(key) == frontier.get(key), key
