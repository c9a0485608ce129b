import streamlit as st

st.title("Steering")
st.info("Steering (additive, clamp, ablate, signed steering and gradient steering from `analysis.steering`) gets "
        "its page in issue #8. Until then use `analysis.steering` from Python.")
