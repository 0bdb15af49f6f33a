"""Ray Serve applications for audited classifiers.

``app.build_app`` (the import path of ``serve/config.yaml``) composes a FastAPI ingress with
one batched classifier deployment per model. Checkpoints load through
``aimfair_ray.models.load_classifier`` (safetensors only), and each model's card
carries the ``audit.json`` that ``aimfair audit`` wrote beside it.
"""
