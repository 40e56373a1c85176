#!/usr/bin/env python3
"""An S3-compatible server on loopback for Shoal's tests: moto's server.

Binds 127.0.0.1 on the given port (default 0: any free port), creates the
buckets named on the command line, prints `listening on http://HOST:PORT`
once it accepts requests, and exits when its standard input closes, so a
test that dies takes the server with it.

    python3 tools/s3_server.py [--port N] BUCKET...

Credentials are not checked; any access key works.
"""

import argparse
import logging
import sys

from moto.moto_server.threaded_moto_server import ThreadedMotoServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("buckets", nargs="*")
    args = parser.parse_args()

    # werkzeug logs every request to stderr; tests print only failures.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()

    if args.buckets:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://{host}:{port}",
            region_name="us-east-1",
            aws_access_key_id="shoal",
            aws_secret_access_key="shoal",
        )
        for bucket in args.buckets:
            s3.create_bucket(Bucket=bucket)

    print(f"listening on http://{host}:{port}", flush=True)
    # Serve until whoever started us goes away.
    sys.stdin.read()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
