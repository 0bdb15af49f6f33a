"""Ray Serve applications for audited classifiers and generators.

Empty until the serving issue lands. It will load checkpoints with
``aimfair_ray.train.models.load_classifier`` (safetensors only) and serve the
``audit.json`` that ``aimfair audit`` writes beside each model.
"""
