"""Chat with a tuned model in the browser (Gradio), in the spirit of ChatGLM-6B's web_demo.py.

    bash scripts/web_demo.sh                                   # tiny model, CHECKPOINT=... for yours
    python scripts/web_demo.py --model_name_or_path models/tiny-glm \\
        --checkpoint output/adgen-toy-train-pt-32-2e-2/checkpoint-200

Then open http://127.0.0.1:7860. Needs the demo extras: bash scripts/setup_demo.sh.

Answers stream in as they are generated; earlier rounds are sent back to the model as [query, answer]
pairs (the same history format as training's --history_column), "Clear history" starts over.
Decoding: temperature 0 is greedy decoding (do_sample off, top_p unused), the same answers as evaluation
and TunedModel.generate; a temperature above 0 samples with that temperature and top_p.
The page is served on 127.0.0.1 only unless --host says otherwise; --share (a public gradio.live link) is off
unless asked for.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reporting from a local demo

import gradio as gr  # noqa: E402

from glmtune.serve import DEFAULT_MAX_NEW_TOKENS, options  # noqa: E402

MAX_NEW_TOKENS = DEFAULT_MAX_NEW_TOKENS  # slider defaults (TunedModel's default too)
TOP_P = 0.7
TEMPERATURE = 0.0  # 0: greedy
# System fonts only: the default theme would fetch Google Fonts, which an offline machine cannot reach.
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "Consolas", "monospace"]


def parse_args(argv=None):
    parser = options.parser(__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish a public gradio.live link (off by default)")
    return parser.parse_args(argv)


def build_demo(tuned, title: str = "glmtune chat") -> gr.Blocks:
    def predict(query, chatbot, max_new_tokens, top_p, temperature, history):
        chatbot, history = list(chatbot or []), list(history or [])
        if not query or not query.strip():
            yield chatbot, history
            return
        sample = temperature > 0
        chatbot += [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        answer = ""
        for piece in tuned.stream(
            query,
            history,
            max_new_tokens=int(max_new_tokens),
            do_sample=sample,
            top_p=top_p if sample else None,
            temperature=temperature if sample else None,
        ):
            answer += piece
            chatbot[-1] = {"role": "assistant", "content": answer.strip()}
            yield chatbot, history
        answer = answer.strip()
        chatbot[-1] = {"role": "assistant", "content": answer}
        yield chatbot, history + [[query, answer]]

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\n{tuned.method} model; temperature 0 decodes greedily.")
        chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", height=420, render_markdown=False, feedback_options=None)
        with gr.Row():
            with gr.Column(scale=4):
                user_input = gr.Textbox(elem_id="user_input", show_label=False, placeholder="Input...", lines=4)
                with gr.Row():
                    submit_btn = gr.Button("Submit", elem_id="submit_btn", variant="primary")
                    empty_btn = gr.Button("Clear history", elem_id="clear_btn")
            with gr.Column(scale=1):
                max_length = gr.Slider(
                    1,
                    4096,
                    value=MAX_NEW_TOKENS,
                    step=1,
                    label="Max new tokens",
                    elem_id="max_new_tokens",
                    interactive=True,
                )
                top_p = gr.Slider(0, 1, value=TOP_P, step=0.01, label="Top P", elem_id="top_p", interactive=True)
                temperature = gr.Slider(
                    0,
                    1.5,
                    value=TEMPERATURE,
                    step=0.01,
                    label="Temperature (0: greedy)",
                    elem_id="temperature",
                    interactive=True,
                )
        history = gr.State([])

        submit_btn.click(
            predict,
            [user_input, chatbot, max_length, top_p, temperature, history],
            [chatbot, history],
            show_progress="minimal",
        )
        submit_btn.click(lambda: "", [], [user_input])
        empty_btn.click(lambda: ([], []), outputs=[chatbot, history])
        chatbot.clear(lambda: [], outputs=[history])  # the chatbot's own trash icon forgets the history too
    return demo


def main(argv=None) -> None:
    args = parse_args(argv)
    tuned = options.load_or_exit(args)
    demo = build_demo(tuned)
    demo.queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        inbrowser=False,
        theme=gr.themes.Default(font=FONTS, font_mono=MONO_FONTS),
    )


if __name__ == "__main__":
    main()
