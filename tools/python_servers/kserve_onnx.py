"""KServe's Python model server serving an ONNX model with onnxruntime.

A `kserve.Model` whose `predict` runs an onnxruntime session, started with
`kserve.ModelServer` (what a KServe custom predictor is), speaking the Open
Inference Protocol v2 over REST. Used by scripts/bench-python-servers to
compare Shoal's replica with KServe on the same model. One intra-op thread,
like the Shoal replica it is compared with.

    python kserve_onnx.py --model_name digits --model_path M.onnx --http_port P --grpc_port G
"""

import argparse
import logging
import uuid

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.utils.numpy_codec import from_np_dtype


class OnnxModel(Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self._path = path
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            self._path, options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.ready = True
        return self.ready

    # With --workers N KServe starts its server processes by pickling the
    # models: an onnxruntime session cannot be pickled, so each process
    # loads its own.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_session", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.load()

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        feeds = {i.name: i.as_numpy().astype(np.float32) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        outputs = []
        for name, value in zip(self._outputs, results):
            out = InferOutput(
                name=name, shape=list(value.shape), datatype=from_np_dtype(value.dtype)
            )
            out.set_data_from_numpy(value, binary_data=False)
            outputs.append(out)
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=outputs
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_path", required=True)
    args, _ = parser.parse_known_args()
    model = OnnxModel(args.model_name, args.model_path)
    server = ModelServer()
    # No log lines per request (uvicorn's access log, KServe's timings), as Shoal's replica
    # writes none: the comparison is of serving, not of logging.
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).disabled = True
    server.start([model])
