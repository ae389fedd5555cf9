"""The checks that decide at start whether the service is ready, besides loading the bundle: the accelerator it was
told to require, and the served variant's answers on the manifest's probe notes.

A failed check leaves the process up but never ready: /readyz (and every model route) answers 503 with the reason,
logged once, so that an orchestrator keeps the instance out of service and an operator reads why.
"""

from __future__ import annotations

import logging

import numpy as np

from app.bundle import CUDA, Bundle, cuda_unused
from app.inference import NoteClassifier, calibrated_probability
from app.settings import Settings

logger = logging.getLogger(__name__)


def readiness_fault(settings: Settings, bundle: Bundle) -> str | None:
    """Why the loaded bundle must not be served, or None; logs the reason."""
    fault = accelerator_fault(settings, bundle) or probe_fault(bundle)
    if fault is not None:
        logger.error("not ready", extra={"fields": {"reason": fault, "providers": bundle.providers}})
    return fault


def accelerator_fault(settings: Settings, bundle: Bundle) -> str | None:
    if settings.require_accelerator and CUDA not in bundle.providers:
        return f"require_accelerator is set but the model runs on {', '.join(bundle.providers)}: {cuda_unused()}"
    return None


def probe_fault(bundle: Bundle) -> str | None:
    """The served variant's P(emergency) on the probe notes against fp32's at export, within the variant's
    tolerance; scored the way the export scored them (the bundle's own token limit and truncation), whatever the
    service's settings."""
    manifest, variant = bundle.manifest, bundle.variant
    if manifest.probes is None:
        logger.warning(
            "the bundle has no probe notes (exported before they existed): the variant is not checked against its "
            "fp32 reference at start; export the bundle again to have it checked",
            extra={"fields": {"version": manifest.version}},
        )
        return None
    tolerance = manifest.variants[variant].probe_atol
    assert tolerance is not None, "the manifest's validator requires probe_atol of every kept variant"
    expected = calibrated_probability(np.asarray(manifest.probes.fp32_margins), manifest.calibration)
    scored = NoteClassifier.from_bundle(bundle).predict_proba(manifest.probes.notes, manifest.probes.batch_size)
    difference = np.nan_to_num(np.abs(scored - expected), nan=np.inf)
    worst = int(np.argmax(difference))
    fields = {"variant": variant, "provider": bundle.providers[0], "max_abs_diff": float(difference[worst])}
    if difference[worst] > tolerance:
        return (
            f"the {variant} variant on {bundle.providers[0]} gives P(emergency) {scored[worst]:.4f} on probe note "
            f"{worst} of the manifest, where fp32 gave {expected[worst]:.4f} at export: it differs by "
            f"{difference[worst]:.3g}, more than the manifest's probe_atol {tolerance:.3g} for {variant}"
        )
    logger.info("probe notes agree with the fp32 reference", extra={"fields": {**fields, "probe_atol": tolerance}})
    return None
