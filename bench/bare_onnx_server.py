"""The second floor: the least a Python gRPC server can do to answer ModelInfer for this model.

grpc.aio on uvloop (as Cyclone's inference service runs), the request parsed by protobuf,
its one FP32 [N, F] tensor handed to onnxruntime, and a minimal ModelInferResponse built
and returned. No validation, prediction ids, metrics, request ids, logging or error
handling: what is left between this and Cyclone is what those cost, and a ratio against it
says how much of a figure a grpc.aio server on this machine could have.

Usage: python -m bench.bare_onnx_server PORT MODEL.onnx
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from grpc import aio

from cyclone.oip.v2 import open_inference_pb2 as oip

METHOD_SERVICE = "inference.GRPCInferenceService"


def session(model_path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as Cyclone runs it
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])


def make_handler(model: ort.InferenceSession) -> Any:
    input_name, output_name = model.get_inputs()[0].name, model.get_outputs()[0].name

    async def model_infer(request: oip.ModelInferRequest, context: Any) -> oip.ModelInferResponse:
        shape = tuple(request.inputs[0].shape)
        matrix = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(shape)
        (prediction, *_) = model.run(None, {input_name: matrix})
        response = oip.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name=output_name, datatype="FP32", shape=prediction.shape)
        response.raw_output_contents.append(prediction.astype("<f4").tobytes())
        return response

    return model_infer


async def main(port: int, model_path: str) -> None:
    server = aio.server()
    handler = grpc.method_handlers_generic_handler(
        METHOD_SERVICE,
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                make_handler(session(model_path)),
                request_deserializer=oip.ModelInferRequest.FromString,
                response_serializer=oip.ModelInferResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
