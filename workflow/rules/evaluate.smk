# ScienceQA accuracy per category, Alpaca held-out loss and perplexity (llama_adapter.evaluate).


rule evaluate:
    input:
        base=BASE,
        tokenizer=TOKENIZER,
        adapter=rules.train_adapter.output.adapter,
        data=evaluation_data,
    output:
        f"{RESULTS}/eval/{{experiment}}/scores.json",
    log:
        f"{RESULTS}/logs/evaluate/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{experiment}}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=30,
        gpu=0,
    params:
        out=lambda w, output: Path(output[0]).parent,
        options=lambda w, input: (
            f"--task scienceqa --data {input.data} --split {config['evaluate']['split']} "
            f"--mode {config['evaluate']['mode']}"
            if experiment(w.experiment)[0] == "scienceqa"
            else f"--task alpaca --data {input.data}/val --row-len {config['train']['row_len']}"
        ),
        batch=config["evaluate"]["batch_size"],
    shell:
        "llama-adapter evaluate --base {input.base} --tokenizer {input.tokenizer} --adapter {input.adapter} "
        "--out {params.out} --batch-size {params.batch} {params.options} > {log} 2>&1"
