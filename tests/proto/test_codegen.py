"""The committed generated code is exactly what the pinned codegen step produces."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("telemetry_pb2.py", "telemetry_pb2.pyi", "telemetry_pb2_grpc.py")


def test_generated_code_matches_proto(tmp_path):
    (tmp_path / "proto" / "v1").mkdir(parents=True)
    shutil.copy(ROOT / "proto/v1/telemetry.proto", tmp_path / "proto/v1/telemetry.proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", "proto/v1/telemetry.proto"],
        cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "proto/v1" / name).read_text()
        committed = (ROOT / "proto/v1" / name).read_text()
        assert fresh == committed, f"proto/v1/{name} is stale: run `make proto` and commit"


def test_every_client_frame_kind_carries_a_header():
    from proto.v1 import telemetry_pb2 as pb
    for field in pb.ClientFrame.DESCRIPTOR.oneofs_by_name["kind"].fields:
        msg = field.message_type
        assert "header" in msg.fields_by_name, f"{msg.name} lacks FrameHeader"
        assert msg.fields_by_name["header"].message_type.name == "FrameHeader"
