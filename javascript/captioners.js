// sd-webui-captioners: client-side helpers (only what the server cannot know).

// The img2img caption button's arguments: [tab index, prompt, 5 images]. Gradio also passes the
// outputs' current values after the inputs, so keep only the inputs; then put the index of the
// open img2img sub-tab first (get_tab_index is the WebUI's own, from ui.js).
function captioners_img2img_args() {
    var args = Array.from(arguments).slice(0, 7);
    args[0] = typeof get_tab_index === "function" ? get_tab_index("mode_img2img") : 0;
    return args;
}

// The masked-area button's arguments: [tab index, mask mode, prompt, 6 images and masks]. The mask
// mode is the index of the checked "Mask mode" radio (1: "Inpaint not masked"), read from the page so
// the button needs no component that the WebUI creates after it wires.
function captioners_img2img_region_args() {
    var args = Array.from(arguments).slice(0, 9);
    args[0] = typeof get_tab_index === "function" ? get_tab_index("mode_img2img") : 0;
    args[1] = captioners_mask_mode();
    return args;
}

function captioners_mask_mode() {
    var radios = gradioApp().querySelectorAll("#img2img_mask_mode input[type=radio]");
    var index = Array.from(radios).findIndex(function (radio) { return radio.checked; });
    return index > 0 ? index : 0;
}

// Settings > Captioners changed (Apply settings): the tab's model dropdowns and the Caption tab's Region
// defaults follow the Settings, through the tab's hidden button (the server then reads the new Settings).
// The WebUI runs onOptionsChanged callbacks when its options first arrive and after every save; only a
// change of one of these settings counts.
var captioners_followed_options = ["captioners_model", "captioners_region_outside", "captioners_region_margin"];
var captioners_settings_seen = null;

function captioners_follow_settings() {
    if (typeof opts !== "object" || !opts || opts.captioners_model === undefined) return;
    var seen = JSON.stringify(captioners_followed_options.map(function (key) { return opts[key]; }));
    var changed = captioners_settings_seen !== null && seen !== captioners_settings_seen;
    captioners_settings_seen = seen;
    var button = changed ? gradioApp().getElementById("captioners_follow_settings") : null;
    if (button) button.click();
}

if (typeof onOptionsChanged === "function") onOptionsChanged(captioners_follow_settings);
