"""Online predictions with Ray Serve: request and answer schemas, the batched model deployment and
the FastAPI ingress. `build_app` is the application (`import_path: eyeray.serve:build_app`)."""

from eyeray.serve.app import ServeArgs, build_app, demo, run, start, stop

__all__ = ["ServeArgs", "build_app", "demo", "run", "start", "stop"]
