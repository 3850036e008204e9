"""CustomVideoX for ComfyUI: zero-shot subject-to-video on the host's native CogVideoX.

Registered through the V3 entry point; the node modules (and torch) load only when the host
asks for the node list.
"""

from __future__ import annotations


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES

    class CustomVideoXExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return CustomVideoXExtension()
