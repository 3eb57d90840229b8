"""Online predictions with Ray Serve: answer schemas, the batched model deployment, the FastAPI
ingress and the application. `build_app` is the application (`import_path: eyeray.serve:build_app`)."""

from eyeray.serve.app import ServeArgs, build_app, run, start, stop

__all__ = ["ServeArgs", "build_app", "run", "start", "stop"]
