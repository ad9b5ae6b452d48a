"""Calibration of the atlas–SAM fusion on the template library itself (``ursam templates calibrate``).

Each support scan is segmented with the other supports as its templates
(leave one out), in every candidate prompt mode, exactly as a query would be
(:func:`URSAMLib.segment.run_modes`). Per organ, the evidence of those runs
(SAM's ensemble, the atlas vote, the locally weighted vote, the truth) then
decides, by leave-one-case-out cross-validation among the calibration cases:

- the fusion's sources and weights (:class:`URSAMLib.fusion.OrganFusion`;
  "atlas only" and "SAM only" are candidates, so the fit can never do worse
  on the calibration data than either source alone), and the organ's prompt
  mode;
- a temperature that makes the fused probability calibrated (maximum
  likelihood), and the threshold of its mask (the best Dice);
- whether Algorithm 1 rectifies the fused result, and with which bound;
- the flagging threshold that puts the most error voxels into the flagged
  regions for the review budget (flagged voxels at most ``budget`` of the
  organ's segmented volume).

It writes ``calibration.json`` (into the library, or where ``out`` says) with
every choice and the leave-one-out Dice of every source and of the fused
result. What each support's runs computed is cached in the user's cache
folder, so a rerun resumes. The query scans of an evaluation never enter it.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from . import __version__
from .atlas_prior import LocalWeighting
from .errors import URSAMError
from .fusion import CLIP, SOURCES, Evidence, OrganFusion, cap_flags, logit
from .progress import Progress
from .uncertainty import LOG2, binary_entropy

CALIBRATION_FILE = "calibration.json"
#: with fewer supports a leave-one-out fit says little: the defaults apply
MIN_SUPPORTS = 3
#: the prompt modes a calibration compares by default (their SAM maps share one view of each scan)
CANDIDATE_MODES = ("slice", "box3d")
#: the source sets a fit tries, single sources first (they win ties)
SOURCE_SETS = (("atlas",), ("atlas_lw",), ("sam",), ("sam", "atlas"), ("sam", "atlas_lw"), ("atlas", "atlas_lw"),
               ("sam", "atlas", "atlas_lw"))
THRESHOLDS = tuple(np.round(np.linspace(0.2, 0.8, 25), 3))
RECTIFY_CANDIDATES = (None, {"lower": "written", "alpha_h": 1.0}, {"lower": "written", "alpha_h": 1.2},
                      {"lower": "midpoint", "alpha_h": 1.0}, {"lower": "midpoint", "alpha_h": 1.2})
#: a rectification (or a richer model) must beat the simpler one by this much mean Dice to be chosen
MIN_GAIN = 0.002


@dataclass
class Calibration:
    """A library's calibration: per organ the fusion model, its ablations, and the leave-one-out Dice."""
    organs: dict  # name -> OrganFusion
    ablations: dict = field(default_factory=dict)  # ablation name -> {organ name -> OrganFusion}
    loo_dice: dict = field(default_factory=dict)  # organ name -> {source or model -> mean Dice}
    supports: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    candidate_modes: tuple = CANDIDATE_MODES
    local: LocalWeighting = LocalWeighting()
    budget: float = 0.1
    seconds: float = 0.0
    path: Optional[str] = None
    sha256: Optional[str] = None

    def modes(self, default_mode, organs=None):
        """The prompt modes a query run needs for these organs (names), ``default_mode`` first."""
        chosen = [m.sam_mode or default_mode for n, m in self.organs.items() if organs is None or n in organs]
        return list(dict.fromkeys([default_mode] + [m for m in chosen if m != default_mode]))

    def variant(self, name):
        """The same calibration with an ablation's models (``no_sam``, ``no_rectify``) in place of the fit."""
        return replace(self, organs={**self.organs, **self.ablations[name]})

    def describe(self, used=True):
        return {"used": bool(used), "path": self.path, "sha256": self.sha256, "supports": list(self.supports),
                "organs": sorted(self.organs), "budget": self.budget}

    def to_json(self):
        return {"ursam_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "supports": list(self.supports), "settings": self.settings,
                "candidate_modes": list(self.candidate_modes), "local_weighting": {
                    "sigma_mm": self.local.sigma_mm, "power": self.local.power, "window": list(self.local.window),
                    "eps": self.local.eps, "label_sigma_voxels": self.local.label_sigma_voxels},
                "budget": self.budget, "seconds": round(self.seconds, 1),
                "organs": {n: m.to_json() for n, m in self.organs.items()},
                "ablations": {a: {n: m.to_json() for n, m in ms.items()} for a, ms in self.ablations.items()},
                "loo_dice": self.loo_dice}

    @classmethod
    def from_json(cls, data, path=None, sha256=None):
        try:
            lw = data.get("local_weighting", {})
            default = LocalWeighting()
            local = LocalWeighting(float(lw.get("sigma_mm", default.sigma_mm)), float(lw.get("power", default.power)),
                                   tuple(lw.get("window", default.window)), float(lw.get("eps", default.eps)),
                                   float(lw.get("label_sigma_voxels", default.label_sigma_voxels)))
            return cls(organs={n: OrganFusion.from_json(m) for n, m in data["organs"].items()},
                       ablations={a: {n: OrganFusion.from_json(m) for n, m in ms.items()}
                                  for a, ms in data.get("ablations", {}).items()},
                       loo_dice=data.get("loo_dice", {}), supports=list(data.get("supports", [])),
                       settings=data.get("settings", {}),
                       candidate_modes=tuple(data.get("candidate_modes", CANDIDATE_MODES)), local=local,
                       budget=float(data.get("budget", 0.1)), seconds=float(data.get("seconds", 0.0)),
                       path=str(path) if path else None, sha256=sha256)
        except (KeyError, TypeError, ValueError) as err:
            raise URSAMError(f"calibration file is not one URSAM wrote ({type(err).__name__}: {err})", path) from None

    @classmethod
    def load(cls, path):
        path = Path(path)
        if not path.is_file():
            raise URSAMError("calibration file not found", path)
        raw = path.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise URSAMError(f"calibration file is not valid JSON ({getattr(err, 'msg', err)})", path) from None
        if not isinstance(data, dict):
            raise URSAMError("calibration file is not one URSAM wrote", path)
        return cls.from_json(data, path, hashlib.sha256(raw).hexdigest())

    def save(self, path):
        from .atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return Calibration.load(path)


def find_calibration(library, path=None, progress=None):
    """The calibration a run on this library uses: ``path`` if given, else the library's own
    ``calibration.json``; None (with a warning) where there is none, or too few supports for one."""
    if path is not None:
        return Calibration.load(path)
    if library is None:
        return None
    own = Path(library.path) / CALIBRATION_FILE
    if own.is_file():
        calibration = Calibration.load(own)
        stale = sorted(set(calibration.supports) ^ set(library.case_ids()))
        if stale and progress is not None:
            progress.warn(f"the library's calibration was fitted on other support scans (differs in "
                          f"{', '.join(stale)}): calibrate it again (ursam templates calibrate)")
        return calibration
    if progress is not None:
        n = len(library.case_ids())
        why = (f"it has {n} support scan(s); calibration needs at least {MIN_SUPPORTS}" if n < MIN_SUPPORTS
               else "run `ursam templates calibrate` on it")
        progress.warn(f"the template library has no calibration ({why}): the uncalibrated default is used "
                      "(UR-SAM with the atlas prior)")
    return None


# ----------------------------------------------------------------------------------------------
# The evidence of the leave-one-out runs

@dataclass
class Case:
    """One organ of one calibration run: its sources over its region, the truth there, and the truth's
    voxels outside the region (they count against every model's Dice)."""
    evidence: Evidence
    truth: np.ndarray
    outside: int
    reference: dict = field(default_factory=dict)  # masks of the existing methods over the region


def _dice(pred, case):
    inter = int(np.count_nonzero(pred & case.truth))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(case.truth)) + case.outside
    return 1.0 if total == 0 else 2.0 * inter / total


def _cases_of_run(run, truth):
    """``{organ name: Case}`` of one mode's run on a calibration scan."""
    out = {}
    for o in run.organs:
        if o.prompt_set != "main":
            continue
        evidence = o.evidence()
        if evidence is None or "atlas_lw" not in evidence.sources:
            continue
        t = truth[o.sl] == o.label
        outside = int(np.count_nonzero(truth == o.label)) - int(np.count_nonzero(t))
        if not t.any() and outside == 0:
            continue  # the scan does not have this organ: nothing to learn from it
        refs = {k: o.masks[k] for k in ("ensemble", "ursam", "ursam+atlas") if k in o.masks}
        refs["atlas vote"] = o.prior.on(o.sl) > 0.5  # the classic majority of the supports' (unblurred) labels
        out[o.name] = Case(evidence, t, outside, refs)
    return out


def _save_cases(path, cases):
    """Per mode and organ: the sources (float16), intensity, truth over the region, outside count."""
    from .atomic import atomic_path

    arrays = {}
    for mode, organs in cases.items():
        for name, c in organs.items():
            k = f"{mode}|{name}|"
            for s, a in c.evidence.sources.items():
                arrays[k + "src:" + s] = a.astype(np.float16)
            arrays[k + "intensity"] = c.evidence.intensity.astype(np.float16)
            arrays[k + "truth"] = c.truth
            arrays[k + "outside"] = np.array(c.outside)
            for r, m in c.reference.items():
                arrays[k + "ref:" + r] = m
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def _load_cases(path):
    out = {}
    with np.load(path) as data:
        for key in data.files:
            mode, name, what = key.split("|", 2)
            entry = out.setdefault(mode, {}).setdefault(name, {"src": {}, "ref": {}})
            if what.startswith("src:"):
                entry["src"][what[4:]] = data[key].astype(np.float32)
            elif what.startswith("ref:"):
                entry["ref"][what[4:]] = data[key]
            else:
                entry[what] = data[key]
    return {mode: {name: Case(Evidence(e["src"], e["intensity"].astype(np.float32)), e["truth"].astype(bool),
                              int(e["outside"]), e["ref"])
                   for name, e in organs.items()} for mode, organs in out.items()}


def _cache_key(library, settings, modes, local):
    digest = hashlib.sha256()
    parts = {"version": __version__, "settings": settings.to_json(), "modes": list(modes),
             "local": [local.sigma_mm, local.power, list(local.window), local.eps, local.label_sigma_voxels],
             # the supports' bytes: a support relabelled or replaced in place is not served from the cache
             "library": library.digest(), "supports": library.case_ids()}
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def cache_folder(key):
    """Where the leave-one-out runs of a calibration are kept: the user's cache, never the library (it
    may be on a read-only share, and a library holds scans and labels, nothing else)."""
    from .sam.fast_encoder import cache_dir

    folder = cache_dir() / "calibration" / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def support_cases(library, case_id, backend, settings, modes, local, progress):
    """Segment one support with the others as templates, in every mode: ``{mode: {organ: Case}}``."""
    from .imageio import read_ct
    from .localize import localize
    from .segment import run_modes

    template = library.case(case_id)
    reference, volume = read_ct(template.image_path)
    _, truth = template.read_labels(reference=reference)
    others = library.without(case_id)
    localization = localize(template.image_path, others, method="registration", progress=progress,
                            margin=settings.margin, missing="skip")
    if not localization.boxes:
        return {}
    runs, _ = run_modes(volume, reference, localization, backend, settings, list(modes), progress,
                        local=local)
    return {mode: _cases_of_run(run, truth) for mode, run in runs.items()}


def calibrate(library, backend, settings=None, progress=None, out=None, modes=CANDIDATE_MODES, budget=0.1,
              local=None):
    """Calibrate the fusion on ``library`` (leave one out); writes and returns the :class:`Calibration`."""
    from .settings import Settings

    progress = progress or Progress()
    settings = (settings or Settings()).check()
    local = local or LocalWeighting()
    ids = library.case_ids()
    if len(ids) < MIN_SUPPORTS:
        raise URSAMError(f"calibration needs at least {MIN_SUPPORTS} support scans (leave one out); the library "
                         f"has {len(ids)}", library.meta_path)
    if settings.localizer != "registration":
        raise URSAMError("calibration needs the registration localizer (the fusion's atlas sources are the "
                         "warped support labels)")
    if not 0 < budget <= 1:
        raise URSAMError(f"the review budget must be in (0, 1], got {budget}")
    t0 = time.perf_counter()
    folder = cache_folder(_cache_key(library, settings, modes, local))
    per_support = {}
    for i, case_id in enumerate(ids):
        progress.info(f"[{i + 1}/{len(ids)}] {case_id}: segmented with the other {len(ids) - 1} supports")
        path = folder / f"{case_id}.npz"
        if path.is_file():
            per_support[case_id] = _load_cases(path)
            continue
        cases = support_cases(library, case_id, backend, settings, modes, local, progress)
        _save_cases(path, cases)
        per_support[case_id] = cases
    progress.stage("fitting the fusion", total=len(library.names))
    organs, ablations, loo = {}, {"no_sam": {}, "no_rectify": {}}, {}
    for k, name in enumerate(library.names.values()):
        progress.step(k, len(library.names))
        by_mode = {m: [per_support[c][m][name] for c in ids if name in per_support[c].get(m, {})] for m in modes}
        by_mode = {m: cs for m, cs in by_mode.items() if len(cs) >= 2}
        if not by_mode:
            continue
        fit = fit_organ(name, by_mode, budget)
        organs[name], loo[name] = fit["model"], fit["loo_dice"]
        ablations["no_sam"][name] = fit["no_sam"]
        ablations["no_rectify"][name] = replace(fit["model"], rectify=None)
    progress.done()
    if not organs:
        raise URSAMError("calibration found no organ that at least two support scans label", library.meta_path)
    calibration = Calibration(organs, ablations, loo, list(ids), settings.to_json(), tuple(modes), local, budget,
                              time.perf_counter() - t0)
    return calibration.save(Path(out) if out else Path(library.path) / CALIBRATION_FILE)


# ----------------------------------------------------------------------------------------------
# Fitting one organ

def _design(case, sources):
    cols = [case.evidence.logits(s).ravel() for s in sources]
    return np.stack(cols + [np.ones(case.truth.size, np.float32)], 1).astype(np.float64)


def _sample(case, rng, negatives=20000):
    """All positive voxels and a weighted sample of the others (the region is mostly background)."""
    y = case.truth.ravel()
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    take = min(len(neg), negatives)
    idx = np.r_[pos, rng.choice(neg, take, replace=False)] if take else pos
    weights = np.r_[np.ones(len(pos)), np.full(take, len(neg) / max(take, 1))]
    return idx, weights


def _logistic(X, y, w, l2=1e-2, iterations=30):
    """Weighted logistic regression by Newton's method (a light ridge keeps it finite on separable data)."""
    beta = np.zeros(X.shape[1])
    ridge = l2 * np.eye(X.shape[1])
    ridge[-1, -1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ beta, -30, 30)))
        grad = X.T @ (w * (p - y)) + ridge @ beta
        hess = (X * (w * p * (1 - p))[:, None]).T @ X + ridge + 1e-9 * np.eye(X.shape[1])
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-7:
            break
    return beta


def _fit_weights(cases, sources, rng):
    """Logit-pooling weights and bias of ``sources`` by maximum likelihood over the cases' regions."""
    Xs, ys, ws = [], [], []
    for c in cases:
        idx, weights = _sample(c, rng)
        Xs.append(_design(c, sources)[idx])
        ys.append(c.truth.ravel()[idx].astype(np.float64))
        ws.append(weights)
    beta = _logistic(np.concatenate(Xs), np.concatenate(ys), np.concatenate(ws))
    return dict(zip(sources, (float(b) for b in beta[:-1]))), float(beta[-1])


def _temperature(cases, model, rng):
    """The temperature that makes the model's probability calibrated over the cases (maximum likelihood)."""
    z, y, w = [], [], []
    base = replace(model, temperature=1.0)
    for c in cases:
        idx, weights = _sample(c, rng)
        z.append(base.logits(c.evidence).ravel()[idx])
        y.append(c.truth.ravel()[idx])
        w.append(weights)
    z, y, w = np.concatenate(z).astype(np.float64), np.concatenate(y).astype(np.float64), np.concatenate(w)
    grid = np.exp(np.linspace(np.log(0.2), np.log(5.0), 61))

    def nll(t):
        zt = np.clip(z / t, -30, 30)
        return float(np.sum(w * (np.logaddexp(0, zt) - y * zt)))

    return float(min(grid, key=nll))


def _best_threshold(cases, model):
    probs = [model.probability(c.evidence) for c in cases]
    scores = [np.mean([_dice(p > t, c) for p, c in zip(probs, cases)]) for t in THRESHOLDS]
    i = int(np.argmax(scores))
    return float(THRESHOLDS[i]), float(scores[i])


def _fitted(cases, sources, mode, name, rng):
    """A model of these sources fitted to ``cases``: weights (single sources: the source itself), the
    temperature, then the threshold."""
    if len(sources) == 1:
        model = OrganFusion(name, {sources[0]: 1.0}, 0.0, sam_mode=mode)
    else:
        weights, bias = _fit_weights(cases, sources, rng)
        model = OrganFusion(name, weights, bias, sam_mode=mode)
    model = replace(model, temperature=_temperature(cases, model, rng))
    threshold, score = _best_threshold(cases, model)
    return replace(model, threshold=threshold), score


def _cross_validated(cases, sources, mode, name, seed):
    """Mean held-out Dice of fitting on all cases but one, for each case in turn."""
    scores = []
    for i in range(len(cases)):
        rng = np.random.default_rng(seed + i)
        model, _ = _fitted(cases[:i] + cases[i + 1:], sources, mode, name, rng)
        scores.append(_dice(model.mask(model.probability(cases[i].evidence), None, cases[i].evidence.intensity),
                            cases[i]))
    return float(np.mean(scores))


def _with_rectification(cases, model):
    """The model with the rectification that does best on the cases (none unless it gains)."""
    def score(m):
        return float(np.mean([_dice(m.mask(m.probability(c.evidence), None, c.evidence.intensity), c)
                              for c in cases]))

    best, best_score = model, score(model)
    for option in RECTIFY_CANDIDATES[1:]:
        m = replace(model, rectify=dict(option))
        s = score(m)
        if s > best_score + MIN_GAIN:
            best, best_score = m, s
    return best, best_score


def _flag_threshold(cases, model, budget):
    """The entropy from which on voxels are flagged: the most error voxels flagged while the flagged
    voxels stay within ``budget`` of the segmented volume, over all the cases together (ties at the
    threshold are cut to the budget when a query is fused: fusion.cap_flags)."""
    us, segmented = [], 0
    for c in cases:
        p = model.probability(c.evidence)
        mask = model.mask(p, None, c.evidence.intensity)
        us.append(binary_entropy(p).ravel())
        segmented += int(np.count_nonzero(mask))
    u = np.sort(np.concatenate(us))[::-1]
    allowed = int(budget * segmented)
    if allowed <= 0 or len(u) == 0:
        return LOG2
    # the entropy of the allowed-th most uncertain voxel: flagging from it on fills the budget
    return float(u[min(allowed, len(u)) - 1])


def fit_organ(name, by_mode, budget, seed=0):
    """Choose and fit one organ's fusion from its calibration cases (``{mode: [Case]}``).

    Returns ``{"model", "no_sam", "loo_dice"}``: the chosen model, the best
    model without SAM (the ablation), and the mean leave-one-out Dice of each
    source alone, of the methods the cases carry, and of the fused result
    (in-sample and cross-validated).
    """
    rng = np.random.default_rng(seed)
    candidates = []  # (cv score, simplicity, mode, sources)
    for mode, cases in by_mode.items():
        for k, sources in enumerate(SOURCE_SETS):
            if not all(s in cases[0].evidence.sources for s in sources):
                continue
            candidates.append((_cross_validated(cases, sources, mode, name, seed), -k, mode, sources))
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    best_cv = candidates[0][0]
    # a richer model must beat the simplest one within reach of the best by MIN_GAIN
    cv, _, mode, sources = max((c for c in candidates if c[0] >= best_cv - MIN_GAIN), key=lambda c: c[1])
    cases = by_mode[mode]
    model, in_sample = _fitted(cases, sources, mode, name, rng)
    raw = _raw_sources(cases)
    best_raw = max(raw.values())
    if in_sample < best_raw:
        # never worse on the calibration data than a source alone
        src = max(raw, key=raw.get)
        model, in_sample = _fitted(cases, (src,), mode, name, rng)
    model, in_sample = _with_rectification(cases, model)
    model = replace(model, flag_threshold=_flag_threshold(cases, model, budget))
    no_sam_cands = [c for c in candidates if "sam" not in c[3]]
    _, _, ns_mode, ns_sources = max(no_sam_cands, key=lambda c: (c[0], c[1]))
    no_sam, _ = _fitted(by_mode[ns_mode], ns_sources, None, name, rng)
    no_sam = replace(no_sam, flag_threshold=_flag_threshold(by_mode[ns_mode], no_sam, budget))
    loo = {f"{k} (0.5)": round(v, 4) for k, v in raw.items()}
    for ref in ("atlas vote", "ensemble", "ursam", "ursam+atlas"):
        if ref in cases[0].reference:
            loo[ref] = round(float(np.mean([_dice(c.reference[ref], c) for c in cases])), 4)
    loo["fusion"] = round(in_sample, 4)
    loo["fusion (cross-validated)"] = round(cv, 4)
    loo["cases"] = len(cases)
    return {"model": model, "no_sam": no_sam, "loo_dice": loo}


def _raw_sources(cases):
    """Mean Dice of each source alone, thresholded at one half."""
    out = {}
    for s in SOURCES:
        if s in cases[0].evidence.sources:
            out[s] = float(np.mean([_dice(c.evidence.sources[s] > 0.5, c) for c in cases]))
    return out
