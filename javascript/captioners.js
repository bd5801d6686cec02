// sd-webui-captioners: client-side helpers (only what the server cannot know).

// The img2img caption button's arguments: [tab index, prompt, 5 images]. Gradio also passes the
// outputs' current values after the inputs, so keep only the inputs; then put the index of the
// open img2img sub-tab first (get_tab_index is the WebUI's own, from ui.js).
function captioners_img2img_args() {
    var args = Array.from(arguments).slice(0, 7);
    args[0] = typeof get_tab_index === "function" ? get_tab_index("mode_img2img") : 0;
    return args;
}
