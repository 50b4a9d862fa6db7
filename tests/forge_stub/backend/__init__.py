"""A stand-in of Forge's ``backend/`` (lllyasviel/stable-diffusion-webui-forge @ dfdcbab): the model objects with
Forge's attribute paths and parameter names, its LoRA loader's backup / replace behaviour, its lazy loading.
Our own code, written from reading Forge; nothing here is Forge's."""
