"""One module per area of the page; each draws into the current Streamlit container."""
