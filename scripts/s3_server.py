"""Run a local MinIO on 127.0.0.1 for manual tests; prints the endpoint and the env vars to export.

    .venv/bin/python scripts/s3_server.py --data .cache/s3 --port 9000 --bucket demo
"""

from __future__ import annotations

import argparse
import sys
import time

from image_embeddings.testing.s3server import start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/s3/data")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", action="append", default=[])
    args = parser.parse_args()
    server = start(args.data, port=args.port)
    for bucket in args.bucket:
        server.client().create_bucket(Bucket=bucket)
    print(f"MinIO ready at {server.endpoint} (data in {args.data}); Ctrl-C stops it. In another shell:")
    for key, value in server.env().items():
        print(f"export {key}={value}")
    print(f"and pass --set s3.endpoint={server.endpoint} --set s3.ssl=false to image-embeddings")
    try:
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
