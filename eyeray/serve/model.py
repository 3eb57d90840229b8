"""The model deployment: one per bundle, named after its task, so each task scales on its own.

A replica loads its bundle once and scores concurrent requests in one model call (`@serve.batch`;
batch size and wait time come from `user_config`, so `serve deploy` retunes them without a
restart). It receives preprocessed images only: decoding stays in the ingress.
"""

# No `from __future__ import annotations`: Serve reads these annotations at run time.
import asyncio
import json
import time
from typing import Any

import numpy as np
from ray import serve

from eyeray.decision.options import DecisionOptions
from eyeray.model.options import InferenceOptions

MAX_BATCH_SIZE, BATCH_WAIT_TIMEOUT_S = 16, 0.01  # defaults; per deployment through user_config
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]  # seconds, also the ingress's
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


@serve.deployment(max_ongoing_requests=64)
class TaskModel:
    """One bundle, loaded once per replica; concurrent requests become one model call. Each request
    carries its threshold override, resolved by the ingress (the request's, else `decision`'s)."""

    def __init__(
        self,
        bundle_uri: str,
        version: str,
        decision: DecisionOptions = DecisionOptions(),
        inference: InferenceOptions = InferenceOptions(),
    ):
        import threading

        from ray.util import metrics

        from eyeray.model import bundle
        from eyeray.model.devices import configure_gpus

        configure_gpus()  # before the model: replicas with fractional GPUs share one
        self.bundle = bundle.load(bundle_uri, inference=inference)
        if self.bundle.version != version:
            raise bundle.BundleError(
                f"{bundle_uri} changed since the application was built "
                f"({version} -> {self.bundle.version}): redeploy it"
            )
        bundle.verify(self.bundle)  # a first trace; `reconfigure` traces the other batch sizes
        self.task, self.decision = self.bundle.manifest["task"], decision
        self.max_batch_size = MAX_BATCH_SIZE
        self._cam, self._cam_lock = None, threading.Lock()
        self.batch_sizes = metrics.Histogram(
            "eyeray_serve_batch_size", "Requests per model call.", boundaries=BATCH_BOUNDARIES, tag_keys=("task",)
        )
        self.model_seconds = metrics.Histogram(
            "eyeray_serve_model_seconds", "Seconds per model call.", boundaries=LATENCY_BOUNDARIES, tag_keys=("task",)
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Batch size and wait time (`user_config`); the model is traced for every padded batch size
        up to the new maximum here, before the replica takes requests, not by the first requests."""
        self.max_batch_size = int(config.get("max_batch_size", MAX_BATCH_SIZE))
        self.predict.set_max_batch_size(self.max_batch_size)
        self.predict.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", BATCH_WAIT_TIMEOUT_S)))
        self.bundle.compiled.warm_up(self.max_batch_size)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def predict(self, requests: list[tuple[np.ndarray, Any, tuple[int, int]]]) -> list[dict[str, Any]]:
        """(preprocessed uint8 image, threshold override or None, the original's (height, width)),
        one per request -> one answer each."""
        start = time.perf_counter()
        images = np.stack([image for image, _, _ in requests])
        sizes = [size for _, _, size in requests]
        probs, verdict = await asyncio.to_thread(self._infer, images, sizes)  # the loop keeps queueing
        self.model_seconds.observe(time.perf_counter() - start, tags={"task": self.task})
        self.batch_sizes.observe(len(requests), tags={"task": self.task})
        answers: list[dict[str, Any]] = [{} for _ in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, thresholds, _) in enumerate(requests):  # requests with the same override decide together
            groups.setdefault(json.dumps(thresholds, sort_keys=True), []).append(i)
        for rows in groups.values():
            thresholds = requests[rows[0]][1]
            decision = self.bundle.decide(probs[rows], thresholds, self.decision.review_below, verdict.subset(rows))
            for j, i in enumerate(rows):
                answers[i] = self._answer(decision, j, len(requests))
        return answers

    def _infer(self, images: np.ndarray, sizes: list[tuple[int, int]]):
        """The model's probabilities and the gate's verdict (`Bundle.infer`, `Bundle.verdict`)."""
        probs, features = self.bundle.infer(images, self.max_batch_size)
        heights, widths = zip(*sizes)
        return probs, self.bundle.verdict(images, features, heights, widths, self.decision.gate)

    async def explain(
        self, image: np.ndarray, class_name: str | None, thresholds: Any, size: tuple[int, int]
    ) -> tuple[dict[str, Any], np.ndarray]:
        """The answer for one image (its original `size`) plus the Grad-CAM heatmap (feature-map
        resolution) of its class."""
        return await asyncio.to_thread(self._explain, image, class_name, thresholds, size)

    def _explain(
        self, image: np.ndarray, class_name: str | None, thresholds: Any, size: tuple[int, int]
    ) -> tuple[dict[str, Any], np.ndarray]:
        from eyeray.model.gradcam import GradCam, explain_decision

        with self._cam_lock:  # built once per replica, on the first explain request
            if self._cam is None:
                self._cam = GradCam(self.bundle.model)
            decision, k, heatmap = explain_decision(
                self.bundle, self._cam, image, class_name, self.decision, size, override=thresholds
            )
        return {**self._answer(decision, 0, 1), "explained_class": self.bundle.classes[k]}, heatmap

    def _answer(self, decision, i: int, batch_size: int) -> dict[str, Any]:
        return {
            "task": self.task,
            **decision.answer(i, self.bundle.classes),
            "bundle_version": self.bundle.version,
            "batch_size": batch_size,
        }
