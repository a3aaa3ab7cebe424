"""Run by test_open_inference.py in a subprocess: talk to Cyclone with tritonclient.

tritonclient's generated protos register the same `inference.*` symbols as
`cyclone.oip`, so this must never be imported by the pytest process. Reads a JSON
job from stdin, prints a JSON result on stdout.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton


def main() -> None:
    job = json.load(sys.stdin)
    client = triton.InferenceServerClient(job["address"])
    out: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "credit_ready": client.is_model_ready("credit"),
        "missing_ready": client.is_model_ready("no-such-model"),
    }
    meta = client.get_model_metadata("credit", as_json=True)
    out["credit_inputs"] = {i["name"]: i["datatype"] for i in meta["inputs"]}
    out["credit_outputs"] = [o["name"] for o in meta["outputs"]]

    credit = job["credit"]
    rows = len(credit["city"])
    inputs = []
    for name in ("age", "income", "debt_ratio"):
        tensor = triton.InferInput(name, [rows, 1], "FP32")
        tensor.set_data_from_numpy(np.array(credit[name], dtype=np.float32).reshape(rows, 1))
        inputs.append(tensor)
    city = triton.InferInput("city", [rows, 1], "BYTES")
    city.set_data_from_numpy(
        np.array([c.encode() for c in credit["city"]], dtype=object).reshape(rows, 1)
    )
    inputs.append(city)
    result = client.infer(
        "credit",
        inputs,
        outputs=[
            triton.InferRequestedOutput("label"),
            triton.InferRequestedOutput("probabilities"),
        ],
    )
    out["credit"] = {
        "label": result.as_numpy("label").ravel().tolist(),
        "probabilities": result.as_numpy("probabilities").tolist(),
        "ids": result.get_response().parameters["cyclone_prediction_ids"].string_param,
    }

    matrix = np.array(job["bench"], dtype=np.float32)
    tensor = triton.InferInput("input", list(matrix.shape), "FP32")
    tensor.set_data_from_numpy(matrix)
    result = client.infer("bench", [tensor])
    out["bench"] = result.as_numpy("variable").ravel().tolist()

    try:
        client.infer("nope", [tensor])
        out["unknown_model_error"] = None
    except triton.InferenceServerException as exc:
        out["unknown_model_error"] = exc.status()
    client.close()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
