"""Every measuring command's code: the stream, the engine, a style switch (`stream`), torch's CPU
threads (`threads`), the GPU's memory and speed (`gpu`), accelerated steps against eager
(`accelerate`) and what WebRTC adds (`remote`, `python -m live2diff_engine.bench.remote`)."""
