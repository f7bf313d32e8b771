"""Datasets, prompt formatting and the training prompt stream.

`DATASETS` is the registry of named datasets (`data.name`): where each one's splits live and how
its gold rationale is written. Adding a dataset is one entry there (see `Dataset`). `load_split`
reads a split of the named dataset, of a local jsonl/parquet file or directory (`data.path`,
read with the named dataset's rules), or from the hub (`data.hub_id`), validating every row into
an `Example`; a bad row is a one-line `DataError` naming its file and line.
`build_prompt` renders a question with the model's chat template, `encode_prompt` turns it into
the token ids every path uses, and `PromptSampler` hands out
shuffled examples epoch after epoch, resumable from a checkpoint.
"""

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from rlkd.answer import gold_answer
from rlkd.config import DataConfig
from rlkd.equations import equation_steps
from rlkd.errors import ConfigError, DataError
from rlkd.filters import strip_calculator
from rlkd.types import Example

logger = logging.getLogger("rlkd.data")

HUB_PROBE_TIMEOUT_S = 5.0  # datasets retries an unreachable hub for ~25 s; we ask once
_LOCAL_FORMATS = (".jsonl", ".parquet")
DATASETS_DIR = Path(__file__).parent / "datasets"


def _gsm8k_rationale(row: dict) -> str:
    """GSM8K's human solution: the answer field before its '####' line."""
    return row["answer"].rpartition("####")[0].strip()


def _equation_rationale(row: dict) -> str:
    """MAWPS/ASDiv-A: the row's infix equation written as one line per operation."""
    if not isinstance(row.get("equation"), str) or not row["equation"].strip():
        raise ValueError("missing or empty 'equation'")
    return "\n".join(equation_steps(row["equation"]))


@dataclass(frozen=True)
class Dataset:
    """A named dataset: `<folder>/<split>.jsonl` rows with a `question` and a GSM8K-style
    `answer` ("... #### N"), and a function writing a row's gold rationale (what gold SFT,
    `cot.prompt_mode=gold`, GKD's reference solutions and `data.max_solution_steps` read)."""

    folder: Path
    rationale: Callable[[dict], str]
    splits: tuple[str, ...] = ("train", "test")
    about: str = ""


# One place to add a dataset: a folder under rlkd/datasets (or anywhere) and an entry here.
DATASETS: dict[str, Dataset] = {
    "gsm8k": Dataset(DATASETS_DIR / "gsm8k", _gsm8k_rationale,
                     about="GSM8K (Cobbe et al. 2021), 7,473 / 1,319, MIT"),
    "mawps_asdiv_a": Dataset(DATASETS_DIR / "mawps_asdiv_a", _equation_rationale,
                             about="MAWPS + ASDiv-A, fold 0 as the SVAMP repository distributes "
                                   "them, 2,341 / 619, MIT"),
    "arith": Dataset(DATASETS_DIR / "arith", _gsm8k_rationale,
                     about="rlkd's one-step addition and subtraction word problems, 400 / 200"),
    "muldiv": Dataset(DATASETS_DIR / "muldiv", _gsm8k_rationale,
                      about="rlkd's one-step two-digit multiplication and division word problems "
                            "(for the calculator environment), 1,000 / 400"),
}


def dataset(cfg: DataConfig) -> Dataset:
    """The registry entry of data.name (compose has checked the name)."""
    return DATASETS[cfg.name]


def gold_text(ex: Example, strip: bool = True) -> str:
    """A gold solution as a training target: the rationale, then the '#### N' line."""
    rationale = strip_calculator(ex.rationale) if strip else ex.rationale
    return f"{rationale}\n#### {ex.answer}"


def load_split(cfg: DataConfig, split: str, limit: int = 0) -> list[Example]:
    """Validated examples of `split` (all of them, or the first `limit`)."""
    spec = dataset(cfg)
    if cfg.path or not cfg.hub_id:
        path = _resolve_local(Path(cfg.path).expanduser() if cfg.path else spec.folder, split)
        # Ids use the folder name, not the full path, so they survive copying the data elsewhere.
        source, split, origin = path.parent.name, path.stem, str(path)
        rows = _jsonl_rows(path) if path.suffix == ".jsonl" else _parquet_rows(path)
    else:
        source, origin = cfg.hub_id, f"{cfg.hub_id}:{split}"
        rows = _hub_rows(cfg, split)
    examples = _examples(rows, source, split, cfg.skip_bad_rows, spec.rationale)
    if not examples:
        raise DataError(f"{origin}: no valid examples")
    return examples[:limit] if limit > 0 else examples


def split_held_out(cfg: DataConfig, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples): the last data.held_out of `examples` are held out."""
    n = cfg.held_out
    if n and n >= len(examples):
        raise DataError(f"data.held_out={n} leaves nothing to train on: the split has {len(examples)} examples")
    return (examples[:-n], examples[-n:]) if n else (examples, [])


def solution_steps(example: Example) -> int:
    """Lines of the gold rationale: GSM8K writes one calculation step per line."""
    return sum(1 for line in example.rationale.splitlines() if line.strip())


def training_pool(cfg: DataConfig, examples: list[Example]) -> list[Example]:
    """The examples training draws from: all of them, or those of at most data.max_solution_steps."""
    if cfg.max_solution_steps <= 0:
        return examples
    kept = [ex for ex in examples if solution_steps(ex) <= cfg.max_solution_steps]
    if not kept:
        raise DataError(f"data.max_solution_steps={cfg.max_solution_steps} keeps none of the "
                        f"{len(examples)} training questions")
    logger.info("data.max_solution_steps=%d: training on %d of %d questions",
                cfg.max_solution_steps, len(kept), len(examples))
    return kept


def _resolve_local(path: Path, split: str) -> Path:
    if path.is_file():
        if path.suffix not in _LOCAL_FORMATS:
            raise DataError(f"{path}: unsupported file type; expected .jsonl or .parquet")
        return path
    if path.is_dir():
        for suffix in _LOCAL_FORMATS:
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}"
        raise DataError(f"{path}: no {split}.jsonl or {split}.parquet; {_listing(path)}")
    raise DataError(f"data.path {path} does not exist; {_listing(path)}")


def _listing(path: Path) -> str:
    while not path.is_dir():  # the nearest existing folder is where a typo is easiest to spot
        path = path.parent
    names = sorted(f"{p.name}/" if p.is_dir() else p.name for p in path.iterdir())
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f"{path} holds: {shown or 'nothing'}"


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str]]:
    # Raw lines: decoding happens in _example so bad JSON is skippable like any other bad row.
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", line


def decode_row(line: str) -> dict:
    """One JSONL line as a JSON object; a ValueError says what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: str | Path, required: tuple[str, ...] = (),
               check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """The one reader of rlkd's own JSONL files (samples, kept datasets, predictions): every
    row, in order. A bad line stops with one `ConfigError` in one style, `<file>:<line>: <what
    is wrong>`: invalid JSON, not an object, missing fields, or what `check` says of the row."""
    rows = []
    for where, line in _jsonl_rows(Path(path)):
        try:
            row = decode_row(line)
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
            if check is not None and (problem := check(row)):
                raise ValueError(problem)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        rows.append(row)
    return rows


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:
        raise DataError(f"{path}: cannot read parquet: {_first_line(e)}") from None
    return ((f"{path}:row {i}", row) for i, row in enumerate(table))


def _hub_rows(cfg: DataConfig, split: str) -> Iterator[tuple[str, dict]]:
    hint = f"set data.path=<local dir> holding {split}.jsonl or {split}.parquet"
    if not datasets.config.HF_HUB_OFFLINE:  # offline mode reads the local cache: nothing to probe
        try:
            HfApi().dataset_info(cfg.hub_id, timeout=HUB_PROBE_TIMEOUT_S)
        except HfHubHTTPError as e:  # the hub answered and refused: unknown id, gated, ...
            raise DataError(f"hub dataset {cfg.hub_id}: {_first_line(e)}; {hint}") from None
        except Exception as e:
            raise DataError(
                f"cannot reach the Hugging Face hub to load {cfg.hub_id} "
                f"({type(e).__name__}: {_first_line(e)}); {hint}"
            ) from None
    try:
        table = datasets.load_dataset(cfg.hub_id, cfg.hub_config or None, split=split)
    except Exception as e:
        raise DataError(
            f"cannot load hub dataset {cfg.hub_id} ({cfg.hub_config}) split {split}: "
            f"{_first_line(e)}; {hint}"
        ) from None
    return ((f"{cfg.hub_id}:{split} row {i}", row) for i, row in enumerate(table))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _examples(rows: Iterable[tuple[str, str | dict]], source: str, split: str, skip_bad: bool,
              rationale: Callable[[dict], str]) -> list[Example]:
    examples, bad = [], []
    # Bad rows keep their index so ids do not shift when skip_bad_rows is turned on.
    for index, (where, row) in enumerate(rows):
        try:
            examples.append(_example(row, f"{source}:{split}:{index}", rationale))
        except ValueError as e:
            if not skip_bad:
                raise DataError(f"{where}: {e}") from None
            bad.append(f"{where}: {e}")
    if bad:
        logger.warning("skipped %d bad rows of %s:%s (first: %s)", len(bad), source, split, bad[0])
    return examples


def _example(row: str | dict, example_id: str, rationale: Callable[[dict], str]) -> Example:
    """One validated Example; raises ValueError saying what is wrong with the row."""
    row = decode_row(row) if isinstance(row, str) else row
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"missing or empty '{key}'")
    return Example(
        id=example_id,
        question=row["question"].strip(),
        answer=gold_answer(row["answer"]),
        rationale=rationale(row),
    )


def build_prompt(tokenizer, question: str, cfg: DataConfig) -> str:
    """The generation prompt for `question`: the chat template if the tokenizer has one."""
    if not getattr(tokenizer, "chat_template", None):
        # Base models: a plain completion prompt; the system prompt would otherwise be lost.
        shots = [f"Question: {q}\nAnswer: {a}" for q, a in cfg.fewshot]
        preamble = "\n\n".join(t for t in (cfg.system_prompt, cfg.instruction, *shots) if t)
        prompt = f"Question: {question}\nAnswer:"
        return f"{preamble}\n\n{prompt}" if preamble else prompt
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for q, a in [*cfg.fewshot, (question, None)]:
        messages.append({"role": "user", "content": f"{cfg.instruction}\n\n{q}" if cfg.instruction else q})
        if a is not None:
            messages.append({"role": "assistant", "content": a})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The token ids of a `build_prompt` prompt: the one tokenization of every path (rollout,
    eval, SFT, CoT, distillation, teacher scoring); vLLM receives these ids, never the text.

    The text's own special tokens are kept as written (a chat template writes its own: Llama 3's
    begins with <|begin_of_text|>), and the tokenizer's BOS is put in front only when it adds one
    and the text does not already start with it. vLLM's text path would add a second BOS to a
    templated prompt; `add_special_tokens=False` would drop the BOS a base model was trained with.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos]
    return [bos, *ids] if adds_bos and ids[:1] != [bos] else ids


class PromptSampler:
    """Endless stream of examples, reshuffled each epoch; resumes exactly from `state_dict`."""

    def __init__(self, examples: list[Example], seed: int):
        if not examples:
            raise ValueError("PromptSampler needs at least one example")
        self.examples = examples
        self.seed, self.epoch, self.cursor = seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        # Seeded per epoch, so the order after a resume depends only on (seed, epoch).
        order = list(range(len(self.examples)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[Example]:
        batch = []
        while len(batch) < n:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            take = self._order[self.cursor : self.cursor + n - len(batch)]
            batch += [self.examples[i] for i in take]
            self.cursor += len(take)
        return batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "num_examples": len(self.examples),
        }

    def load_state_dict(self, state: dict) -> None:
        # A different dataset size would silently reorder everything: refuse instead.
        if state["num_examples"] != len(self.examples):
            raise ValueError(
                f"sampler state is for {state['num_examples']} examples, "
                f"but this run has {len(self.examples)}"
            )
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._permutation()
