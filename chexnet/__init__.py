"""The CheXNet reproduction as a library: every piece of logic the top-level scripts run.

The scripts at the top of the repository (retrain.py, eval_model.py, visualize_prediction.py,
predict.py, ...) only read their command line and call into this package; nothing here imports
a script. The README's "Layout" section gives each module's role.
"""
