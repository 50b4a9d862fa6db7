"""Stand-in of the built-in Lora extension's ``networks`` module (extensions-builtin/Lora/networks.py, WebUI v1.10.1):
the LoRA list that the Lora tab and ``<lora:…>`` read, refilled by ``list_available_networks()`` from
``shared.cmd_opts.lora_dir`` (the extension's scripts import it under the top-level name ``networks``)."""
import os

from modules import shared

available_networks = {}
available_network_aliases = {}
calls = []


def list_available_networks():
    calls.append(shared.cmd_opts.lora_dir)
    available_networks.clear()
    available_network_aliases.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir):
        for f in files:
            if f.endswith((".pt", ".ckpt", ".safetensors")):
                name = os.path.splitext(f)[0]
                available_networks[name] = os.path.join(root, f)
                available_network_aliases[name] = available_networks[name]
