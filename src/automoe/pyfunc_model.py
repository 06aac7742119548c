"""The registered translator as MLflow models-from-code: this file is logged with the model
and run on load (MLflow executes it and takes what `set_model` names), so the model folder
holds code as text and no pickle: whoever can write an artifact cannot make `load_model`
unpickle a class of theirs. Tracking code only (it imports mlflow); `automoe` itself travels
in the model's `code/` folder.

Under `mlflow models serve` it checks each request against the serving limits
(`automoe.serving.Limits`, set by AUTOMOE_SERVE_* variables) and decodes requests that
arrive together in one batch (`automoe.serving.Batcher`)."""

import threading

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class TranslatorModel(mlflow.pyfunc.PythonModel):
    """pyfunc: a DataFrame with a `text` column, or a list of strings -> translations."""

    def load_context(self, context):
        from automoe.model import kernels
        from automoe.serving import BatchConfig, DecodeConfig, Limits, Translator

        config = context.model_config or {}
        precision = config.get("precision", "fp32")  # models registered before: fp32 on the CPU
        device = config.get("device", "cpu")  # fp16/bf16: a GPU (Translator refuses one that is not there)
        if "kernels" in context.artifacts:  # the engine it was timed with, where this is the same machine kind
            kernels.use(context.artifacts["kernels"])
        decode = DecodeConfig(precision=precision, device=device)
        self.translator = Translator.from_files(context.artifacts["model"], context.artifacts["spm"], decode)
        self.limits, self.batching = Limits.from_env(), BatchConfig.from_env()
        self.batcher = None  # started by the first predict: a model loaded only to be unwrapped runs no threads
        self._starting = threading.Lock()

    def predict(self, context, model_input, params=None):
        from automoe.serving import RequestError

        if hasattr(model_input, "columns"):
            column = "text" if "text" in model_input.columns else model_input.columns[0]
            lines = model_input[column].tolist()
        else:
            lines = list(model_input)
        try:
            prepared = self.translator.prepare(self.limits.check(lines))  # encoded once
            if prepared.cut and not self.limits.truncate:
                cut = prepared.cut[0]
                raise RequestError(f"inputs[{cut}]: longer than the model's source length (truncation is off)")
        except RequestError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        hyps = self._batcher().translate_ids(prepared.sources) if prepared.sources else []
        return self.translator.finish(prepared, hyps)

    def _batcher(self):
        from automoe.serving import Batcher

        with self._starting:
            if self.batcher is None:
                self.batcher = Batcher(self.translator.translate_ids, self.batching, self.translator.decode.device)
        return self.batcher


set_model(TranslatorModel())
