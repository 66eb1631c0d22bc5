"""`longva eval`: benchmarks through lmms-eval, and multiple-choice video QA on local data.

lmms-eval finds our model through the `lmms_eval.models` entry-point group, whose value must
give it a `ModelManifest` (or a function returning one); it calls the loaded object, so the
entry point names this light function and not the model class (calling the class would load
a 7B model while lmms-eval merely lists its models).
"""

LMMS_MODEL_ID = "longva_cli"
LMMS_CLASS_PATH = "longva_cli.eval.lmms.LongVALmms"


def lmms_manifest():
    """lmms-eval's registration record for `--model longva_cli` (imports lmms-eval)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_MODEL_ID, simple_class_path=LMMS_CLASS_PATH)
