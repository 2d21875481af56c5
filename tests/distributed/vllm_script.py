"""A typical vLLM offline script with only the import changed (``from vllm import ...``):
run by test_vllm_api.py as ``python -m tests.distributed.vllm_script MODEL``. Every call a
vLLM user makes here must work; it prints one line per call it got through."""

from __future__ import annotations

import sys

from seesaw_mcore import LLM, SamplingParams


def main() -> None:
    model = sys.argv[1]
    llm = LLM(model, tensor_parallel_size=1, gpu_memory_utilization=0.9, max_model_len=2048,
              enforce_eager=True, seed=0, dtype="float32", trust_remote_code=False)
    print("ok LLM(...)")
    tok = llm.get_tokenizer()
    assert tok.decode(tok("hello world")["input_ids"], skip_special_tokens=True) == "hello world"
    print("ok get_tokenizer")
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=1, logprobs=2,
                            prompt_logprobs=1, min_tokens=2, min_p=0.05,
                            repetition_penalty=1.1, presence_penalty=0.1,
                            frequency_penalty=0.1, skip_special_tokens=True,
                            include_stop_str_in_output=False, stop=["\n\n"])
    outputs = llm.generate(["Return the number of", "The function returns"], params)
    for out in outputs:
        c = out.outputs[0]
        assert isinstance(out.prompt, str) and out.prompt_token_ids and out.finished
        assert c.finish_reason in ("stop", "length") and isinstance(c.text, str)
        assert c.cumulative_logprob is not None and c.cumulative_logprob <= 0
        assert c.stop_reason is None or isinstance(c.stop_reason, (int, str))
        assert len(c.logprobs) == len(c.token_ids)
        for tid, entry in zip(c.token_ids, c.logprobs):
            lp = entry[tid]  # the sampled token is always there
            assert lp.logprob <= 0 and lp.rank >= 1 and isinstance(lp.decoded_token, str)
        assert out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
        assert all(out.prompt_token_ids[i] in out.prompt_logprobs[i]
                   for i in range(1, len(out.prompt_token_ids)))
        print(f"ok generate: {c.text!r} ({c.finish_reason})")
    chat = llm.chat([{"role": "user", "content": "Return the number of bytes"}],
                    SamplingParams(temperature=0, max_tokens=8))
    assert chat[0].prompt and chat[0].outputs[0].token_ids
    convs = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    assert len(llm.chat(convs, SamplingParams(temperature=0, max_tokens=4),
                        use_tqdm=False)) == 2
    print("ok chat")
    print("ALL OK")


if __name__ == "__main__":
    main()
