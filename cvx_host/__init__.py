"""The host layer: everything that touches ``comfy.*`` but is not a node schema.

``cvx_core`` (host-free maths) <- ``cvx_host`` (patches on the host's models) <- ``nodes`` (V3 schemas).
A DiT family is one backbone module (:mod:`.backbone` is the seam; :mod:`.cogvideox`, :mod:`.wan`);
the patches (:mod:`.reference_patch` inserts a reference, :mod:`.frames_patch` biases the reference
frames a model already carries) are written against the seam, not against one family.
"""
