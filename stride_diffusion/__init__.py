"""stride: few-step class-conditional diffusion sampling as a service.

Three packages under one name: `stride_diffusion.solvers` (the inference core, torch only),
`stride_diffusion.offline` (what turns a pretrained model into a fast one) and
`stride_diffusion.service` (the HTTP API, the queue and the workers). `offline` and `service`
build on `solvers`; neither imports the other.
"""
