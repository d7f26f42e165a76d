// Render the maths that pymdownx.arithmatex (generic mode) leaves in .arithmatex elements, with the
// bundled KaTeX (no network); re-run on every page of mkdocs-material's instant navigation.
function renderMaths() {
  for (const el of document.querySelectorAll(".arithmatex")) {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
}
if (typeof document$ !== "undefined") {
  document$.subscribe(renderMaths);
} else {
  document.addEventListener("DOMContentLoaded", renderMaths);
}
