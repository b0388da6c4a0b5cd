"""The trait judge: per trait, P(high | reply) for a Speaker Y reply, trained on real BIG5-CHAT replies.

One scikit-learn pipeline per trait (TF-IDF of word 1-2-grams and character 2-5-grams, then an
L2 logistic regression), trained on the high and low replies of that trait in the training
scenarios of the data and measured on the replies of its held-out scenarios (never seen by the
judge nor, at the default split, by any adapter). scikit-learn is enough here: the replies of the
two levels differ in wording a linear model on n-grams separates (0.9+ held-out accuracy), it
trains in seconds on a CPU, and it is an artefact anyone can rebuild bit for bit.

The judge is a versioned artefact in ``<data_dir>/judges/<name>/``: ``model.npz`` and
``card.json`` (data source and hash, rows per side, held-out accuracy and the real replies' own
high-low gap per trait, library versions, the model file's sha256). It is built by ``big5 judge
train`` or on first use (under a file lock, so two processes never build it twice), never at
import time, and a card whose sha256 does not match its file is refused.

``model.npz`` holds the fitted parameters only, as plain arrays (per trait and feature block the
TF-IDF vocabulary and idf, then the logistic regression's coefficients, intercept and classes),
read with ``allow_pickle=False`` and rebuilt into the same scikit-learn pipeline: loading a judge
never runs code from its folder, which a pickle (``joblib.load``) would. A judge saved as a pickle
by an older version is refused (the default one is rebuilt from its data instead).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
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
JUDGE_STORAGE = "sklearn-arrays-v1"
"""How ``model.npz`` stores the pipeline (:func:`_arrays`, :func:`_rebuild`); a card without it is a pickle"""
_MODEL_FILE = "model.npz"
_CARD_FILE = "card.json"
_LEGACY_MODEL_FILE = "model.joblib"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same parameters give the same bytes (and sha256)


class JudgeNotFound(NotFound):
    code, title = "judge-not-found", "Unknown trait judge"


class JudgeCorrupt(Conflict):
    code, title = "judge-corrupt", "The trait judge's files do not match its card"


class JudgeOutdated(Conflict):
    code, title = "judge-outdated", "The trait judge is stored in a format this version does not load"


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
    storage: str = ""
    """how the model file stores the pipeline (JUDGE_STORAGE); empty on a card of a pickled judge"""

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
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            model_path = staging / _MODEL_FILE
            arrays = {f"{t.value}.{key}": value for t, m in self.models.items() for key, value in _arrays(m).items()}
            data = _npz_bytes(arrays)
            model_path.write_bytes(data)
            self.card.sha256 = hashlib.sha256(data).hexdigest()
            self.card.storage = JUDGE_STORAGE
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
        """The judge saved in ``folder``; its model file must hash to the card's sha256 (the bytes parsed are
        the bytes hashed) and be stored as arrays: a pickled judge of an older version is refused."""
        name = folder.name
        card_path, model_path = folder / _CARD_FILE, folder / _MODEL_FILE
        if not card_path.is_file():
            raise JudgeNotFound(f"no trait judge {name!r} (build it with `big5 judge train --name {name}`)")
        card = _read_card(card_path, name)
        if card.storage != JUDGE_STORAGE:
            stored = f"as {card.storage!r}" if card.storage else f"as a pickle ({_LEGACY_MODEL_FILE})"
            raise JudgeOutdated(
                f"trait judge {name!r} is stored {stored}, which this version does not load (a pickle can run "
                f"arbitrary code when loaded): rebuild it with `big5 judge train --name {name}`"
            )
        if not model_path.is_file():
            raise JudgeCorrupt(f"trait judge {name!r}: its card names no model file; rebuild it (`big5 judge train`)")
        data = model_path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != card.sha256:
            raise JudgeCorrupt(
                f"trait judge {name!r}: model sha256 {actual[:12]} does not match its card ({card.sha256[:12]}); "
                f"rebuild it with `big5 judge train --name {name}`"
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
            models = _models_from_arrays(arrays)
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
            raise JudgeCorrupt(f"trait judge {name!r}: its model file does not hold a {JUDGE_STORAGE} judge") from exc
        return cls(models, card)


def _read_card(path: Path, name: str) -> JudgeCard:
    try:
        return JudgeCard.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise JudgeCorrupt(f"trait judge {name!r}: its card does not parse ({exc})") from exc


def _stored_storage(folder: Path) -> str | None:
    """The ``storage`` a judge folder's card names ("" for a pickled judge), None without a card."""
    card_path = folder / _CARD_FILE
    if not card_path.is_file():
        return None
    return _read_card(card_path, folder.name).storage


# The pipeline as arrays: per feature block of the FeatureUnion the TF-IDF vocabulary (terms in
# column order) and idf, then the logistic regression. Everything else is _pipeline()'s constants.
def _arrays(pipeline: Any) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for block, vectorizer in pipeline.named_steps["features"].transformer_list:
        terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
        vocabulary = np.array(terms, dtype=str)
        if vocabulary.tolist() != terms:  # numpy drops trailing NULs of fixed-width strings
            raise ValueError(f"judge: a {block} term does not survive a string array")
        out[f"{block}.vocabulary"] = vocabulary
        out[f"{block}.idf"] = np.asarray(vectorizer.idf_, dtype=np.float64)
    logreg = pipeline.named_steps["logreg"]
    out["logreg.coef"] = np.asarray(logreg.coef_, dtype=np.float64)
    out["logreg.intercept"] = np.asarray(logreg.intercept_, dtype=np.float64)
    out["logreg.classes"] = np.asarray(logreg.classes_, dtype=np.int64)
    return out


def _rebuild(arrays: dict[str, np.ndarray]) -> Any:
    """A fitted :func:`_pipeline` from one trait's arrays (the keys :func:`_arrays` writes)."""
    pipeline = _pipeline()
    width = 0
    for block, vectorizer in pipeline.named_steps["features"].transformer_list:
        vocabulary, idf = arrays[f"{block}.vocabulary"], arrays[f"{block}.idf"]
        if vocabulary.dtype.kind != "U" or vocabulary.ndim != 1 or idf.dtype != np.float64:
            raise ValueError(f"judge: bad {block} arrays")
        if idf.shape != vocabulary.shape:
            raise ValueError(f"judge: {block} has {len(vocabulary)} terms and {len(idf)} idf values")
        vectorizer.set_params(vocabulary={term: i for i, term in enumerate(vocabulary.tolist())})
        vectorizer.idf_ = idf
        width += len(vocabulary)
    logreg = pipeline.named_steps["logreg"]
    coef, intercept, classes = arrays["logreg.coef"], arrays["logreg.intercept"], arrays["logreg.classes"]
    if coef.dtype != np.float64 or coef.shape != (1, width) or intercept.shape != (1,) or classes.tolist() != [0, 1]:
        raise ValueError("judge: bad logistic-regression arrays")
    logreg.coef_, logreg.intercept_, logreg.classes_, logreg.n_features_in_ = coef, intercept, classes, width
    return pipeline


def _models_from_arrays(arrays: dict[str, np.ndarray]) -> dict[Trait, Any]:
    by_trait: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        trait, _, rest = key.partition(".")
        by_trait.setdefault(trait, {})[rest] = value
    unknown = set(by_trait) - {t.value for t in TRAITS}
    if unknown or not by_trait:
        raise ValueError(f"judge: no trait or unknown traits {sorted(unknown)}")
    expected = set(_arrays_keys())
    models: dict[Trait, Any] = {}
    for trait in TRAITS:  # the order the judge was trained in, so score() lists traits alike
        if trait.value in by_trait:
            if set(by_trait[trait.value]) != expected:
                raise ValueError(f"judge: {trait.value} arrays {sorted(by_trait[trait.value])}")
            models[trait] = _rebuild(by_trait[trait.value])
    return models


def _arrays_keys() -> list[str]:
    blocks = [block for block, _ in _pipeline().named_steps["features"].transformer_list]
    return [f"{b}.{a}" for b in blocks for a in ("vocabulary", "idf")] + [
        f"logreg.{a}" for a in ("coef", "intercept", "classes")
    ]


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez_compressed`` without its member timestamps (and without pickles): reproducible bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
    return buffer.getvalue()


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
        """The judge ``name``: cached, else loaded, else (the default judge, ``build``) trained now.

        The default judge is also rebuilt, not loaded, when an older version saved it as a pickle; any
        other judge in that state is refused (:class:`JudgeOutdated` says how to rebuild it).
        """
        if name in self._cache:
            return self._cache[name]
        folder = self.folder(name)
        if _stored_storage(folder) != JUDGE_STORAGE and build and name == JUDGE_NAME:
            from filelock import FileLock

            self.root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.root / f".{name}.lock")):
                stored = _stored_storage(folder)  # another process may have built it meanwhile
                if stored != JUDGE_STORAGE:
                    if stored is not None:
                        logger.warning("judge %s: stored as %r by an older version; rebuilding it", name, stored)
                    rows, _ = load_filtered(self.dataset)
                    TraitJudge.train(rows, dataset=self.dataset, name=name).save(folder)
        elif _stored_storage(folder) is None:
            raise JudgeNotFound(f"unknown trait judge {name!r} (build it with `big5 judge train --name {name}`)")
        judge = TraitJudge.load(folder)
        self._cache[name] = judge
        return judge
