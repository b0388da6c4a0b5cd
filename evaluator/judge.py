"""The trait judge: per trait, P(high | reply) for a Speaker Y reply, trained on real BIG5-CHAT replies.

One scikit-learn pipeline per trait (TF-IDF of word 1-2-grams and character 2-5-grams, then an
L2 logistic regression), trained on the high and low replies of that trait in the training
scenarios of the data and measured on the replies of its held-out scenarios (never seen by the
judge nor, at the default split, by any adapter). scikit-learn is enough here: the replies of the
two levels differ in wording a linear model on n-grams separates (0.9+ held-out accuracy), it
trains in seconds on a CPU, and it is an artefact anyone can rebuild bit for bit.

The judge is a versioned artefact in ``<data_dir>/judges/<name>/``: ``model.joblib`` and
``card.json`` (data source and hash, rows per side, held-out accuracy and the real replies' own
high-low gap per trait, library versions, the model file's sha256). It is built by ``big5 judge
train`` or on first use (under a file lock, so two processes never build it twice), never at
import time, and a card whose sha256 does not match its file is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from big5core.dataset import BUNDLED_REAL, Row, dataset_hash, heldout_split, load_filtered
from big5core.errors import Conflict, NotFound
from big5core.traits import TRAITS, Level, Trait

logger = logging.getLogger(__name__)

JUDGE_NAME = "big5chat-judge"
JUDGE_KIND = "tfidf-logreg-v1"
_MODEL_FILE = "model.joblib"
_CARD_FILE = "card.json"


class JudgeNotFound(NotFound):
    code, title = "judge-not-found", "Unknown trait judge"


class JudgeCorrupt(Conflict):
    code, title = "judge-corrupt", "The trait judge's files do not match its card"


@dataclass
class TraitMetrics:
    train_rows: int
    heldout_rows: int
    heldout_accuracy: float | None
    heldout_gap: float | None
    """mean P(high) of the held-out high replies minus that of the held-out low replies: what real
    replies of the two levels score apart, the ceiling a persona can be compared with"""
    heldout_cross: dict[str, float] = field(default_factory=dict)
    """other trait -> how far that trait's judge moves between this trait's held-out high and low
    replies (same high-minus-low difference): the cross effect the real replies themselves show, the
    reference for a 2x2 mixture's cross effect (empty on a card written before it was measured)"""


@dataclass
class JudgeCard:
    name: str
    kind: str
    dataset: str
    data_hash: str
    heldout_fraction: float
    created_at: str
    versions: dict[str, str]
    traits: dict[str, TraitMetrics]
    sha256: str = ""
    heldout_scenarios: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JudgeCard:
        traits = {k: TraitMetrics(**v) for k, v in data.pop("traits").items()}  # an older card: no heldout_cross
        return cls(traits=traits, **data)

    def format(self) -> str:
        lines = [f"judge {self.name} ({self.kind}), data {self.dataset} sha256 {self.data_hash[:12]}"]
        lines.append(f"{'trait':<18}{'train':>7}{'held out':>10}{'accuracy':>10}{'real gap':>10}")
        for trait, m in self.traits.items():
            acc = "-" if m.heldout_accuracy is None else f"{m.heldout_accuracy:.3f}"
            gap = "-" if m.heldout_gap is None else f"{m.heldout_gap:+.3f}"
            lines.append(f"{trait:<18}{m.train_rows:>7}{m.heldout_rows:>10}{acc:>10}{gap:>10}")
        if any(m.heldout_cross for m in self.traits.values()):
            lines += [
                "",
                "real replies' cross effect: each judge's high-low difference between a trait's held-out replies",
            ]
            lines.append(f"{'replies of':<18}" + "".join(f"{t[:13]:>15}" for t in self.traits))
            for trait, m in self.traits.items():
                values = [m.heldout_gap if other == trait else m.heldout_cross.get(other) for other in self.traits]
                lines.append(f"{trait:<18}" + "".join(f"{'-' if v is None else f'{v:+.3f}':>15}" for v in values))
        return "\n".join(lines)


def _pipeline() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline

    features = FeatureUnion(
        [
            ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, lowercase=True)),
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
        ]
    )
    return Pipeline([("features", features), ("logreg", LogisticRegression(C=4.0, max_iter=5000))])


def _xy(rows: Sequence[Row], trait: Trait) -> tuple[list[str], list[int]]:
    chosen = [r for r in rows if r.trait is trait]
    return [r.speaker_y.strip() for r in chosen], [1 if r.level is Level.HIGH else 0 for r in chosen]


def _versions() -> dict[str, str]:
    import sklearn

    return {"scikit-learn": sklearn.__version__, "judge": JUDGE_KIND}


class TraitJudge:
    """Five binary classifiers; :meth:`score` gives P(high | reply) per trait for each text."""

    def __init__(self, models: dict[Trait, Any], card: JudgeCard) -> None:
        self.models = models
        self.card = card

    @property
    def traits(self) -> tuple[Trait, ...]:
        return tuple(self.models)

    def score(self, texts: Sequence[str]) -> dict[str, list[float]]:
        """trait -> P(high) of each text (in order). Empty input gives empty lists."""
        texts = [t.strip() for t in texts]
        if not texts:
            return {t.value: [] for t in self.models}
        return {t.value: [float(p) for p in model.predict_proba(texts)[:, 1]] for t, model in self.models.items()}

    @classmethod
    def train(cls, rows: Sequence[Row], *, dataset: str, name: str = JUDGE_NAME) -> TraitJudge:
        """Train on the training scenarios of ``rows`` (filtered rows), measure on the held-out ones."""
        from big5core.dataset import HELDOUT_FRACTION

        train, held = heldout_split(rows)
        models: dict[Trait, Any] = {}
        metrics: dict[str, TraitMetrics] = {}
        pending_cross: dict[Trait, tuple[list[str], list[str]]] = {}
        for trait in TRAITS:
            x, y = _xy(train, trait)
            if len(set(y)) < 2:
                logger.warning("judge: trait %s has one level only in %s; no classifier", trait.value, dataset)
                continue
            model = _pipeline().fit(x, y)
            models[trait] = model
            hx, hy = _xy(held, trait)
            accuracy = gap = None
            if hx and len(set(hy)) == 2:
                held_high = [text for text, t in zip(hx, hy, strict=True) if t == 1]
                held_low = [text for text, t in zip(hx, hy, strict=True) if t == 0]
                probs = model.predict_proba(hx)[:, 1]
                accuracy = float(sum(int(p >= 0.5) == t for p, t in zip(probs, hy, strict=True)) / len(hy))
                high = [p for p, t in zip(probs, hy, strict=True) if t == 1]
                low = [p for p, t in zip(probs, hy, strict=True) if t == 0]
                gap = float(sum(high) / len(high) - sum(low) / len(low))
            metrics[trait.value] = TraitMetrics(len(x), len(hx), accuracy, gap)
            if accuracy is not None:
                pending_cross[trait] = (held_high, held_low)
        if not models:
            raise JudgeNotFound(f"no trait of {dataset!r} has replies at both levels: nothing to train a judge on")
        for trait, (held_high, held_low) in pending_cross.items():
            metrics[trait.value].heldout_cross = {
                other.value: float(np.mean(models[other].predict_proba(held_high)[:, 1]))
                - float(np.mean(models[other].predict_proba(held_low)[:, 1]))
                for other in models
                if other is not trait
            }
        card = JudgeCard(
            name=name,
            kind=JUDGE_KIND,
            dataset=dataset,
            data_hash=dataset_hash(rows),
            heldout_fraction=HELDOUT_FRACTION,
            created_at=datetime.now(UTC).isoformat(),
            versions=_versions(),
            traits=metrics,
            heldout_scenarios=sorted({r.scenario for r in held}),
        )
        return cls(models, card)

    def save(self, folder: Path) -> Path:
        """Write model and card atomically: a new folder renamed into place (an old one is replaced)."""
        import joblib

        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            model_path = staging / _MODEL_FILE
            joblib.dump({t.value: m for t, m in self.models.items()}, model_path)
            self.card.sha256 = _sha256(model_path)
            (staging / _CARD_FILE).write_text(json.dumps(self.card.to_json(), indent=2))
            for path in (model_path, staging / _CARD_FILE):
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
            if folder.exists():
                old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
                folder.rename(old)
                staging.rename(folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: Path) -> TraitJudge:
        import joblib

        card_path, model_path = folder / _CARD_FILE, folder / _MODEL_FILE
        if not card_path.is_file() or not model_path.is_file():
            raise JudgeNotFound(f"no trait judge in {folder} (build it with `big5 judge train`)")
        card = JudgeCard.from_json(json.loads(card_path.read_text()))
        actual = _sha256(model_path)
        if actual != card.sha256:
            raise JudgeCorrupt(
                f"judge {folder}: model sha256 {actual[:12]} does not match its card ({card.sha256[:12]})"
            )
        models = {Trait(k): v for k, v in joblib.load(model_path).items()}
        return cls(models, card)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class JudgeStore:
    """Where judges live (``<data_dir>/judges``); builds the default one on first use."""

    def __init__(self, root: Path, dataset: str = BUNDLED_REAL) -> None:
        self.root = root
        self.dataset = dataset
        self._cache: dict[str, TraitJudge] = {}

    def folder(self, name: str = JUDGE_NAME) -> Path:
        return self.root / name

    def train(self, name: str = JUDGE_NAME, *, dataset: str | None = None) -> TraitJudge:
        """Train (or retrain) and save a judge under a file lock; returns it."""
        from filelock import FileLock

        source = dataset or self.dataset
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f".{name}.lock")):
            rows, _ = load_filtered(source)
            judge = TraitJudge.train(rows, dataset=source, name=name)
            judge.save(self.folder(name))
        self._cache[name] = judge
        logger.info("trained judge %s on %s\n%s", name, source, judge.card.format())
        return judge

    def get(self, name: str = JUDGE_NAME, *, build: bool = True) -> TraitJudge:
        """The judge ``name``: cached, else loaded, else (the default judge, ``build``) trained now."""
        if name in self._cache:
            return self._cache[name]
        folder = self.folder(name)
        if not (folder / _CARD_FILE).is_file():
            if not build or name != JUDGE_NAME:
                raise JudgeNotFound(f"unknown trait judge {name!r} (build it with `big5 judge train --name {name}`)")
            from filelock import FileLock

            self.root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.root / f".{name}.lock")):
                if not (folder / _CARD_FILE).is_file():  # another process may have built it meanwhile
                    rows, _ = load_filtered(self.dataset)
                    TraitJudge.train(rows, dataset=self.dataset, name=name).save(folder)
        judge = TraitJudge.load(folder)
        self._cache[name] = judge
        return judge
