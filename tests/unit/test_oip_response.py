"""ModelInfer responses built from a cached serialized head plus per-request fields read back
exactly as the whole message built at once would."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import numpy as np
import pytest

from cyclone.models.repository import ModelRepository
from cyclone.oip.v2 import open_inference_pb2 as oip
from services.inference import convert
from services.inference.model import LoadedModel

if TYPE_CHECKING:
    from tests.conftest import ModelRepo


def _whole(
    model: LoadedModel, ids: list[str], raw: dict[str, np.ndarray], wanted: list[str], rid: str
) -> oip.ModelInferResponse:
    """The response built field by field, the plain way."""
    response = oip.ModelInferResponse(model_name=model.name, model_version=model.version, id=rid)
    response.parameters[convert.PREDICTION_IDS_PARAMETER].string_param = ",".join(ids)
    for name in wanted:
        array = raw[name]
        bytes_tensor = array.dtype.kind in "OUS"
        response.outputs.add(
            name=name,
            datatype="BYTES" if bytes_tensor else convert._oip_datatype(array),
            shape=array.shape,
        )
        response.raw_output_contents.append(
            convert.encode_bytes_tensor(array)
            if bytes_tensor
            else array.astype("<" + array.dtype.str[1:]).tobytes()
        )
    return response


@pytest.mark.parametrize("name", ["bench", "credit"])
@pytest.mark.parametrize("rows", [1, 3, 1, 7])  # 1 twice: the second answer uses the cached head
def test_response_reads_back_as_the_whole_message(
    model_repo: ModelRepo, name: str, rows: int
) -> None:
    model = LoadedModel(ModelRepository(model_repo.root).files(name))
    frame = model_repo.bench_x[:rows] if name == "bench" else model_repo.credit_rows.iloc[:rows]
    columns = (
        {n: np.asarray(frame[:, j], dtype=np.float64) for j, n in enumerate(model.feature_names)}
        if name == "bench"
        else {n: frame[n].to_numpy() for n in model.feature_names}
    )
    outputs = model.predict(columns)
    ids = [f"id-{i}" for i in range(rows)]
    for wanted, rid in ((model.output_names, "req-1"), (model.output_names[:1], "")):
        data = convert.infer_response(model, ids, outputs, wanted, rid)
        assert isinstance(data, bytes)
        parsed = oip.ModelInferResponse.FromString(data)
        assert parsed == _whole(model, ids, dict(outputs.raw), list(wanted), rid)
        # and each part is where a client looks for it
        assert parsed.parameters[convert.PREDICTION_IDS_PARAMETER].string_param == ",".join(ids)
        assert [o.shape[0] for o in parsed.outputs] == [rows] * len(wanted)


def test_cached_heads_do_not_keep_an_unloaded_model_alive(model_repo: ModelRepo) -> None:
    model = LoadedModel(ModelRepository(model_repo.root).files("bench"))
    outputs = model.predict(
        {n: model_repo.bench_x[:1, j].astype(np.float64) for j, n in enumerate(model.feature_names)}
    )
    convert.infer_response(model, ["a"], outputs, model.output_names, "")
    assert model in convert._response_heads
    before = len(convert._response_heads)
    del model, outputs
    gc.collect()
    assert len(convert._response_heads) == before - 1
