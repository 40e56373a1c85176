"""An MLServer runtime that serves an ONNX model with onnxruntime.

MLServer (Seldon) ships no ONNX runtime of its own; this is the custom
runtime its documentation describes (an `MLModel` with `load` and
`predict`), what a user serving an ONNX file with MLServer writes. Used by
scripts/bench-python-servers to compare Shoal's replica with MLServer on
the same model. One intra-op thread, like the Shoal replica it is compared
with.
"""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {
            request_input.name: NumpyCodec.decode_input(request_input).astype(np.float32)
            for request_input in payload.inputs
        }
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output(name=name, payload=value)
                for name, value in zip(self._outputs, results)
            ],
        )
