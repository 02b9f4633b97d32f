"""The serving front: the `meshserve` CLI (and, with the server issue, gRPC). No model logic."""
