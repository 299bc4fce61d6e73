"""Parses Prometheus text exposition from stdin with the reference Python parser
(prometheus_client) and prints every sample as JSON: [{"name", "labels", "value"}, ...].

A format error makes the parser raise, and this script exit non-zero with the error on stderr.
"""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    samples = []
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.append(
                {"name": sample.name, "labels": sample.labels, "value": sample.value}
            )
    json.dump({"types": types, "samples": samples}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
