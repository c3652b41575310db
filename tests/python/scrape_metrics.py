#!/usr/bin/env python3
"""Scrapes a Sightline /metrics endpoint and parses it with prometheus_client's parser (an independent
reader of the exposition format). Prints one JSON object per sample: name, labels, value."""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode("utf-8")
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        print(json.dumps({"name": sample.name, "type": family.type,
                          "labels": sample.labels, "value": sample.value}))
